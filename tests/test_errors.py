"""dino_vos.errors: a library message names the API parameter; the CLI shows it as the option."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from dino_vos.backbones import load_backbone
from dino_vos.cli import flag_name, main
from dino_vos.errors import BackboneError, InputError, naming, param

CLI_FLAG = re.compile(r"(?<![\w-])--[a-z]")


def test_api_error_names_the_parameter_and_the_cli_error_the_option(
    clip_dir, tiny_weights, tmp_path
):
    with pytest.raises(BackboneError) as caught:
        load_backbone(weights=tiny_weights, checkpoint_key="student")
    message = str(caught.value)
    assert "checkpoint_key=student does not apply" in message
    assert not CLI_FLAG.search(message), message

    result = CliRunner().invoke(main, [
        "propagate", str(clip_dir / "frames"), "--mask", str(clip_dir / "masks" / "00000.png"),
        "--out", str(tmp_path / "o"), "--weights", str(tiny_weights),
        "--checkpoint-key", "student", "--device", "cpu",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    cli_message = message.replace("checkpoint_key=student", "--checkpoint-key student")
    assert result.output.splitlines()[-1] == f"Error: {cli_message}", result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("name", "value", "api", "cli"),
    [
        ("short_side", 60, "short_side=60", "--short-side 60"),
        ("weights", None, "weights=", "--weights"),
        ("name", None, "name=", "--backbone"),
        ("out_dir", "runs/a", "out_dir=runs/a", "--out runs/a"),
        ("allow_partial", True, "allow_partial=True", "--allow-partial"),
        ("pretrained", False, "pretrained=False", "--random-init"),
        ("optim.base_lr", None, "optim.base_lr=", "--lr"),
        ("crops.local_number", 6, "crops.local_number=6", "--set crops.local_number=6"),
    ],
)
def test_a_parameter_reads_as_keyword_in_the_api_and_as_option_in_the_cli(name, value, api, cli):
    error = InputError(f"bad {param(name, value)}: fix it")
    assert str(error) == f"bad {api}: fix it"
    with naming(flag_name):
        assert str(error) == f"bad {cli}: fix it"
    assert str(error) == f"bad {api}: fix it"  # the CLI's naming ends with its block
