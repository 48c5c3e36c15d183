"""The one logger: `raytrain: ` lines, info on stdout, warnings on stderr, rank 0 only below WARNING."""

from raytrain.log import log, set_level


def test_lines_streams_and_ranks(capsys, monkeypatch):
    log.info("hello %s", "there")
    log.warning("careful")
    out = capsys.readouterr()
    assert out.out == "raytrain: hello there\n" and out.err == "raytrain: careful\n"
    monkeypatch.setenv("RANK", "3")  # another Ray Train worker: its info is dropped, its warnings say who
    log.info("again")
    log.warning("again")
    out = capsys.readouterr()
    assert out.out == "" and out.err == "raytrain[rank 3]: again\n"


def test_level(capsys):
    try:
        set_level("WARNING")
        log.info("hidden")
        assert capsys.readouterr().out == ""
    finally:
        set_level("INFO")
