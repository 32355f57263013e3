"""The registry: block types registered at any time are valid everywhere."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PLUGIN = textwrap.dedent('''
    import json
    from typing import Literal

    import torch
    from torch import nn

    import attnzoo
    from attnzoo.blocks import BlockConfig
    from attnzoo.cli import main


    class Scale(nn.Module):
        def __init__(self, channels: int, init: float = 1.0) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.full((channels, 1, 1), init))

        def forward(self, x):
            return x * self.scale


    @attnzoo.register_block
    class ScaleConfig(BlockConfig):
        type: Literal["my_scale"]
        init: float = 1.0
        module = Scale


    assert "my_scale" in attnzoo.list_blocks()
    assert attnzoo.create_block("my_scale", 8, init=2.0).scale.shape == (8, 1, 1)
    spec = {"name": "plugged", "backbone": {"name": "resnet18"},
            "insert": [{"block": {"type": "my_scale", "init": 0.5}, "at": "after_conv2",
                        "stages": [4]}]}
    model = attnzoo.create_model(spec, num_classes=3)
    print("blocks", len(model.attnzoo_blocks), model.attnzoo_blocks[0].block_type)
    print("out", tuple(model.eval()(torch.randn(1, 3, 64, 64)).shape))
    print("yaml", attnzoo.ModelSpec.from_yaml(model.attnzoo_spec.to_yaml()) == model.attnzoo_spec)
    schema = attnzoo.ModelSpec.model_json_schema()
    print("schema", "my_scale" in json.dumps(schema))
    try:
        attnzoo.create_model({**spec, "insert": [{"block": {"type": "my_scal"},
                                                  "at": "after_conv2"}]})
    except attnzoo.SpecError as exc:
        print("typo", "did you mean 'my_scale'" in str(exc))
    main(["schema"])
''')


def test_a_block_registered_after_import_works_in_specs_schema_and_create_model() -> None:
    run = subprocess.run([sys.executable, "-c", PLUGIN], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[:6] == ["blocks 2 my_scale", "out (1, 3)", "yaml True", "schema True",
                         "typo True", "{"]
    assert '"const": "my_scale"' in run.stdout  # `attnzoo schema` lists the plugin
