"""`tq-eval` argument errors: argparse errors (usage, one error line, exit code 2), before any model is loaded."""

import subprocess
import sys

import pytest
import torch

from tq_transformers.evaluation import cli


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("tq-eval: error:")]
    assert len(errors) == 1, err
    assert err.splitlines()[-1] == errors[0]  # the error is the last line, after the usage
    return errors[0]


@pytest.mark.parametrize("argv, expected", [
    (["--config", "no-such-config"], "config must be a YAML file or one of"),
    (["--methods", "zip"], "methods must be names from the config"),
    (["--methods", ","], "methods must name at least one setting"),
    (["--dtype", "int4"], "dtype must be one of"),
    (["--max-length", "3"], "max_length must be an integer >= 64, got 3"),
    (["--max-length", "abc"], "argument --max-length: invalid int value: 'abc'"),
    (["--data", "no/such/text.txt"], "perplexity.data must be one of"),
    (["--haystack", "nope"], "needle.haystack must be one of"),
    (["--model", "./no/such/folder"], "no such path './no/such/folder'"),
    (["--device", "tpu"], "device must be cpu, cuda, cuda:N"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_arguments_are_one_line_argparse_errors(capsys, argv, expected):
    assert expected in _error(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_is_an_argument_error(capsys):
    assert "needs a CUDA GPU" in _error(capsys, ["--device", "cuda"])


def test_bad_yaml_setting_is_an_argument_error(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("methods: kivi\n")
    assert "methods must be a list of settings, got str 'kivi'" in _error(capsys, ["--config", str(path)])


def test_command_line_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "tq_transformers.evaluation.cli", "--dtype", "int4"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("tq-eval: error: dtype must be one of")


def test_help_names_the_reference_and_the_download():
    text = cli.build_parser().format_help()
    assert "'full'" in text and "1.1 GB" in text and "nothing is installed" in text
