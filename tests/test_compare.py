"""`lpt compare`: the table of several runs' rows (terminal, Markdown, CSV), the refusal of runs on
other test sets, and the plot."""
import csv
import json

import pytest

from lpt_lightning.cli import main
from lpt_lightning.compare import COLUMNS

COUNTS = [300, 40, 8]
LEVELS = {"kingdom": 95.0, "phylum": 90.0, "class": 85.0, "order": 80.0, "family": 75.0, "genus": 72.5}
TAXONOMY_COLUMNS = [f"acc@{level}" for level in LEVELS]


def row(acc, digest, nll=1.25):
    """A metrics.json row: every metric, the extras derived from acc so each row is distinct."""
    values = {"acc": acc, "acc_many": acc + 10, "acc_medium": acc, "acc_few": None, "top5": acc + 20,
              "balanced_acc": acc - 1, "worst_class_acc": 0.0, "hmean": 0.0, "gmean": acc - 5, "macro_f1": acc - 2,
              "nll": nll, "ece": 3.5, "worst_class": 2, "per_class": [acc + 10, acc, 0.0]}
    return values | {"checkpoint_sha256": digest}


def write_run(path, results, held_out="h1", test="t1", convention="lpt", **extra):
    path.mkdir(parents=True)
    payload = {"split_convention": convention, "held_out_digest": held_out, "test_digest": test,
               "class_counts": COUNTS, "class_names": ["a", "b", "c"], **extra, "results": results}
    (path / "metrics.json").write_text(json.dumps(payload))
    return path


@pytest.fixture()
def two_runs(tmp_path):
    phase = write_run(tmp_path / "phase2_visual", {"test": row(60.5, "aaaaaaaaaaaa")})
    scorer = row(70.25, "bbbbbbbbbbbb", nll=0.875) | {"taxonomy": LEVELS, "taxonomy_few": {"genus": 10.0}}
    pipeline = write_run(tmp_path / "pipe", {"test: LPT++ (scorer)": scorer,
                                             "fit split (val): LPT++ (scorer)": row(80.0, "bbbbbbbbbbbb")},
                         phases={"phase3_moe": "phase3_moe"})
    return phase, pipeline


def test_table_markdown_and_csv_hold_every_row_of_every_run(two_runs, tmp_path, capsys):
    phase, pipeline = two_runs
    md, table, plot = tmp_path / "out" / "c.md", tmp_path / "c.csv", tmp_path / "c.png"
    main(["compare", str(phase), str(pipeline), "--markdown", str(md), "--csv", str(table), "--plot", str(plot)])
    # The taxonomy levels one row has are columns after the metrics ("-" for the rows without).
    columns = [*COLUMNS[:14], *TAXONOMY_COLUMNS, *COLUMNS[14:]]
    assert COLUMNS[13:15] == ("ece", "split_convention")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == columns
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split() == [str(phase), "test", "60.50", "70.50", "60.50", "-", "80.50", "59.50", "0.00", "0.00",
                                "55.50", "58.50", "1.25", "3.50", *["-"] * 6, "lpt", "h1", "t1", "aaaaaaaaaaaa"]
    assert lines[3].split()[:4] == [str(pipeline), "test:", "LPT++", "(scorer)"]
    assert lines[3].split()[4:] == ["70.25", "80.25", "70.25", "-", "90.25", "69.25", "0.00", "0.00", "65.25",
                                    "68.25", "0.88", "3.50", "95.00", "90.00", "85.00", "80.00", "75.00", "72.50",
                                    "lpt", "h1", "t1", "bbbbbbbbbbbb"]
    assert len(lines) == 5
    with open(table, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == columns
    assert rows[1] == [str(phase), "test", "60.5", "70.5", "60.5", "", "80.5", "59.5", "0.0", "0.0", "55.5", "58.5",
                       "1.25", "3.5", *[""] * 6, "lpt", "h1", "t1", "aaaaaaaaaaaa"]
    assert rows[2][:2] == [str(pipeline), "test: LPT++ (scorer)"]
    assert rows[2][12:20] == ["0.875", "3.5", "95.0", "90.0", "85.0", "80.0", "75.0", "72.5"]
    assert rows[3][:3] == [str(pipeline), "fit split (val): LPT++ (scorer)", "80.0"]
    assert len(rows) == 4
    markdown = md.read_text().splitlines()
    assert markdown[0] == "| " + " | ".join(columns) + " |"
    assert markdown[1] == "| --- | --- | " + "---: | " * 18 + "--- | --- | --- | --- |"
    assert markdown[2].startswith(f"| {phase} | test | 60.50 | 70.50 | 60.50 | - | 80.50 |")
    assert markdown[2].endswith("| 3.50 | - | - | - | - | - | - | lpt | h1 | t1 | aaaaaaaaaaaa |")
    assert len(markdown) == 5
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("key, other", [("held_out_digest", "h2"), ("test_digest", "t9"), ("split_convention", "oltr")])
def test_runs_on_other_test_sets_are_refused_unless_allowed(tmp_path, capsys, key, other):
    first = write_run(tmp_path / "a", {"test": row(60.0, "aaaaaaaaaaaa")})
    settings = {"held_out": "h1", "test": "t1", "convention": "lpt"}
    settings[{"held_out_digest": "held_out", "test_digest": "test", "split_convention": "convention"}[key]] = other
    second = write_run(tmp_path / "b", {"test": row(61.0, "bbbbbbbbbbbb")}, **settings)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(first), str(second)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    current = {"held_out_digest": "h1", "test_digest": "t1", "split_convention": "lpt"}[key]
    assert f"{first} and {second} may have been evaluated on different test sets: {key} {current}" in err
    assert f"vs {other}" in err and "--allow-different-test-sets" in err
    main(["compare", str(first), str(second), "--allow-different-test-sets"])
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[2:]] == [str(first), str(second)]


def test_a_file_without_the_digests_is_refused_and_a_missing_one_named(tmp_path, capsys):
    first = write_run(tmp_path / "a", {"test": row(60.0, "aaaaaaaaaaaa")})
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"split_convention": "lpt", "class_counts": COUNTS,
                                                  "results": {"test": {"acc": 50.0, "per_class": [1, 2, 3]}}}))
    with pytest.raises(SystemExit):
        main(["compare", str(first), str(old)])
    assert f"held_out_digest h1 ({first / 'metrics.json'}) vs not recorded ({old / 'metrics.json'})" in \
        capsys.readouterr().err
    main(["compare", str(first), str(old), "--allow-different-test-sets"])
    assert capsys.readouterr().out.splitlines()[3].split()[:3] == [str(old), "test", "50.00"]
    with pytest.raises(SystemExit):
        main(["compare", str(tmp_path / "nowhere")])
    assert "nowhere: no metrics.json" in capsys.readouterr().err
