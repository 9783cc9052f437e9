"""The one-line errors of :mod:`normfree.console`."""

from __future__ import annotations

from normfree.console import error_line, out_of_memory, with_article


def test_a_worker_traceback_gives_its_message_without_the_exception_path() -> None:
    """A DataLoader worker's error (re-raised with the worker's traceback as its text) printed
    as ``error: normfree.data.imagefolder.UnreadableImageError: cannot decode …``."""
    text = (
        "Caught UnreadableImageError in DataLoader worker process 0.\n"
        "Original Traceback (most recent call last):\n"
        '  File "x.py", line 1, in raw\n'
        "    raise UnreadableImageError(...)\n"
        "normfree.data.imagefolder.UnreadableImageError: cannot decode image a/bad.png; "
        "remove or replace the file"
    )
    message = "cannot decode image a/bad.png; remove or replace the file"
    assert error_line(ValueError(text)) == message
    short = text.replace("normfree.data.imagefolder.Unreadable", "")  # `ImageError: …`
    assert error_line(ValueError(short)) == message
    plain = "Traceback (most recent call last):\n  ...\nstill: a message with a colon"
    assert error_line(RuntimeError(plain)) == "still: a message with a colon"  # no class: kept
    key = "Traceback (most recent call last):\n  ...\nbuiltins.KeyError: 'label'"
    assert error_line(RuntimeError(key)) == "KeyError: 'label'"  # a bare repr keeps its class
    assert error_line(RuntimeError(key.replace(": 'label'", ":"))) == "KeyError"


def test_out_of_memory_names_the_size_and_the_fix() -> None:
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                       "40000000000 bytes. Error code 12")  # fmt: skip
    assert out_of_memory(cpu, "use less") == "out of memory (37.3 GiB asked for): use less"
    cuda = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; …)")
    assert out_of_memory(cuda, "x") == "out of memory (2.00 GiB asked for): x"
    assert out_of_memory(RuntimeError("shape mismatch"), "x") is None
    assert out_of_memory(ValueError("out of memory"), "x") is None


def test_a_type_name_takes_its_article() -> None:
    assert [with_article(w) for w in ("int", "OrderedDict", "tuple", "Tensor", "")] == [
        "an int", "an OrderedDict", "a tuple", "a Tensor", "a "
    ]  # fmt: skip


def test_ctrl_c_while_the_commands_load_is_one_line(monkeypatch, capsys) -> None:
    """Building the parser imports every command's module, which takes a second or two; a
    Ctrl-C then used to print a ``KeyboardInterrupt`` traceback (found stopping a grid just
    after it started). It now ends ``normfree`` as Ctrl-C does later: ``interrupted``, 130."""
    import normfree.cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(normfree.cli, "build_parser", interrupted)
    assert normfree.cli.main(["train", "--help"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
