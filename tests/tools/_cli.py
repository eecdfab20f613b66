"""Shared pieces of the command-line tool tests."""

TINY = ["--tiny", '{"image_size": 32, "num_layers": 1}', "--dtype", "fp32", "--device", "cpu", "--no-progress"]


def one_line_error(capsys):
    """The captured stderr, checked to be one line without a traceback."""
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err
