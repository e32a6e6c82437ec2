"""The quickstart end to end, shortened: data, 2-process direct pretraining, conservative
fine-tuning, evaluation, NVE test, plots and summary.json."""
import json

from esen_train.cli.train import main

PNG = b"\x89PNG\r\n\x1a\n"


def test_quickstart_runs_every_step(tmp_path, capfd):
    out = tmp_path / "quickstart"
    code = main(["quickstart", "--out", str(out), "--structures", "60", "--md-steps", "20",
                 "direct.max_steps=4", "direct.val_every=2", "direct.checkpoint_every=2", "direct.max_atoms=96",
                 "conservative.max_steps=2", "conservative.val_every=2", "conservative.checkpoint_every=2",
                 "conservative.max_atoms=96", "logging.wandb.mode=disabled"])
    assert code == 0
    # DDP's warnings about its own settings (an unused-parameter search with none unused; a
    # gradient layout) would be a user's first sight of the main job: there are none.
    output = "".join(capfd.readouterr())
    assert "find_unused_parameters" not in output and "Grad strides" not in output
    summary = json.loads((out / "summary.json").read_text())
    for stage in ("direct", "conservative"):
        row = summary[stage]
        assert row["energy_mae_mev_per_atom"] > 0 and row["force_mae_mev_per_A"] > 0
        assert "drift_mev_per_atom_per_ps" in row
        for plot in (row["parity_plot"], row["energy_plot"]):
            assert open(plot, "rb").read(8) == PNG
    assert open(summary["learning_curves"], "rb").read(8) == PNG
    assert summary["wall_time_s"] > 0
    assert (out / "data" / "emt_train" / "manifest.json").is_file()
