"""Console progress: a bar on a terminal, plain lines in a file, nothing when quiet; and the
progress of `esen-data convert`, `esen-train eval` and `esen-train md`. The trainer's lines,
from real runs, are in tests/engine/test_run_status.py."""
from __future__ import annotations

import io
import json
import re

import ase.io

from esen_train.cli.train import main as esen_train
from esen_train.cli.data import main as esen_data
from esen_train.progress import ConsoleProgress, StageConsole, format_duration
from tests.evaluation_helpers import labelled_copper_structures, write_checkpoint

# A plain line: what count/total unit (percent) | [details |] rate | elapsed | left
PLAIN_LINE = r"^{what} (\d+)/{total} {unit} \(\d+%\) \| {details}[\d.]+ {unit}/s \| elapsed \d+:\d\d:\d\d \| left \d+:\d\d:\d\d$"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_file_gets_a_plain_line_per_tenth_of_the_way():
    stream = io.StringIO()
    with ConsoleProgress("convert", 1000, "structures", stream=stream) as progress:
        for _ in range(8):
            progress.update(125)  # passes 100, 200, ... at 125, 250, 375, 500, 625, 750, 875, 1000
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    counts = [int(re.match(PLAIN_LINE.format(what="convert", total=1000, unit="structures", details=""), line).group(1))
              for line in lines]
    assert counts == [125, 250, 375, 500, 625, 750, 875, 1000]


def test_a_terminal_gets_a_live_bar():
    stream = Terminal()
    with ConsoleProgress("eval", 10, "structures", stream=stream) as progress:
        for _ in range(10):
            progress.update(1, "E MAE 1.0 meV/atom")
        progress.write("a message above the bar")
    text = stream.getvalue()
    assert "\r" in text and "10/10" in text and "100%" in text and "E MAE 1.0 meV/atom" in text
    assert "a message above the bar\n" in text
    assert not re.search(r"\| elapsed ", text)  # no plain lines


def test_disabled_progress_prints_nothing_but_keeps_time():
    stream = Terminal()
    progress = ConsoleProgress("md", 100, "steps", stream=stream, enabled=False)
    progress.update(50)
    progress.write("never shown")
    progress.close()
    assert stream.getvalue() == ""
    assert progress.rate() > 0 and progress.time_left_s() >= 0


def test_unknown_total_and_durations():
    stream = io.StringIO()
    progress = ConsoleProgress("convert", None, "structures", stream=stream)
    progress.update(1000)
    assert stream.getvalue().startswith("convert 1000/? structures | ")
    assert "left" not in stream.getvalue()
    assert progress.time_left_s() is None
    assert format_duration(3725.4) == "1:02:05" and format_duration(None) == "?" and format_duration(float("inf")) == "?"


def test_stage_console_before_the_stage_starts_prints_the_hand_over_validation(capsys):
    class Best:
        best_value, best_step, validations_since_best = float("inf"), 0, 0

    console = StageConsole("conservative", 30, 5, "force_mae_mev_per_A", 0, enabled=True)
    console.show({"stage": "conservative", "split": "val", "step": 0, "energy_mae_mev_per_atom": 12.5,
                  "loaded_from": "RUN/checkpoints/direct/best"}, Best())
    assert capsys.readouterr().out == ("conservative validation at step 0/30 | E MAE 12.5 meV/atom"
                                       " | weights loaded from RUN/checkpoints/direct/best\n")
    assert console.timing() == {"elapsed_s": 0.0, "time_left_s": None}


def test_convert_shows_progress_on_stderr_unless_quiet(tmp_path, capsys):
    xyz = tmp_path / "emt.xyz"
    assert esen_data(["emt", "--out", str(xyz), "--num", "20", "--seed", "1", "--extxyz"]) == 0
    capsys.readouterr()
    assert esen_data(["convert", str(xyz), "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert re.search(PLAIN_LINE.format(what="convert", total=20, unit="structures", details=""), captured.err, re.M)
    assert "wrote 20 structures" in captured.out and "convert 20/20" not in captured.out
    assert esen_data(["convert", str(xyz), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_eval_shows_progress_on_stderr_and_json_stays_clean(tmp_path, capsys):
    data = tmp_path / "labelled.xyz"
    ase.io.write(data, labelled_copper_structures(count=9), format="extxyz")  # 10 structures
    write_checkpoint(tmp_path / "run", stage="conservative")
    assert esen_train(["eval", str(tmp_path / "run"), "--data", str(data), "--json", "--max-atoms", "8",
                       "--out", str(tmp_path / "eval")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["num_structures"] == 10
    counts = [int(m.group(1)) for m in re.finditer(
        PLAIN_LINE.format(what="eval", total=10, unit="structures", details=""), captured.err, re.M)]
    assert counts and counts[-1] == 10 and counts == sorted(counts)
    assert esen_train(["eval", str(tmp_path / "run"), "--data", str(data), "--quiet", "--out", str(tmp_path / "eval")]) == 0
    assert capsys.readouterr().err == ""


def test_md_shows_each_tenth_of_the_steps_with_the_energy_change(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "run", stage="conservative")
    structure = tmp_path / "cu.xyz"
    ase.io.write(structure, labelled_copper_structures(count=1)[0])
    assert esen_train(["md", str(checkpoint), "--structure", str(structure), "--steps", "20", "--timestep", "1",
                       "--temperature", "300", "--json", "--out", str(tmp_path / "md")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["steps"] == 20
    line = PLAIN_LINE.format(what="md", total=20, unit="steps", details=r"total energy change [+-]\d+\.\d{4} meV/atom \| ")
    assert [int(m.group(1)) for m in re.finditer(line, captured.err, re.M)] == list(range(2, 21, 2))
