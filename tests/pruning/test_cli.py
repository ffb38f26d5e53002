from fastmerge.cli import main
from fastmerge.pruning import load_masks


def test_prune_command(tiny_model, tmp_path, capsys):
    config = tmp_path / "prune.yml"
    config.write_text(f"model: {tiny_model}\nscore: magnitude\nsparsity: 0.25\n")
    assert main(["prune", str(config), str(tmp_path / "out")]) == 0
    assert "pruned" in capsys.readouterr().out
    assert load_masks(tmp_path / "out").info["sparsity"] == "0.25"
    config.write_text(f"model: {tiny_model}\nscore: magnitude\nsparsity: 1.5\n")
    assert main(["prune", str(config), str(tmp_path / "out2")]) == 2
    assert "sparsity" in capsys.readouterr().err
