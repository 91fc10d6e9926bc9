"""Two-process training end to end on a backbone whose timm head keeps layers after pooling (ConvNeXt)."""

import json

from timm_qsenn.hub import load_model

from .conftest import tiny_overrides, train_two_processes


def test_two_processes_train_a_convnext_end_to_end(toy_folder, tmp_path):
    # Before its unused head norm was removed, DDP stopped in the first step: "Expected to have finished
    # reduction in the prior iteration ... parameters that were not used in producing loss".
    output = tmp_path / "run"
    args = tiny_overrides(toy_folder, output, backbone="test_convnext") + [
        "dense.epochs=1",
        "finetune.iterations=1",
        "finetune.epochs=[1]",
        "finetune.lr=0.0005",
        "data.batch_size=4",
    ]
    result = train_two_processes(args, port=29543)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["n_features"] == 8
    model = load_model(str(output))
    assert model.head.stage == "ternary" and model.pruned == ["backbone.head"]
