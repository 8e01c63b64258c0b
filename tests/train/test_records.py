import json

from kzoo.train.records import RunRecords


def test_truncate_drops_rows_and_lines_the_checkpoint_had_not_seen(tmp_path):
    records = RunRecords(tmp_path)
    for epoch in range(3):
        for step in range(epoch * 10 + 1, epoch * 10 + 11):
            records.add_log({"step": step, "loss": 1.0 / step})
        records.add_summary({"epoch": epoch, "train_loss": 1.0, "eval_top1": 50.0 + epoch, "lr": 0.1})
    with open(records.log, "a") as f:
        f.write('{"step": 31, "lo')  # a line cut short by a kill
    records.truncate(epochs_done=2, step=25)
    assert [int(r["epoch"]) for r in records.summary_rows()] == [0, 1]
    steps = [json.loads(line)["step"] for line in records.log.read_text().splitlines()]
    assert steps == list(range(1, 26))
    assert list(records.summary_rows()[0]) == ["epoch", "train_loss", "eval_top1", "lr"]


def test_plot_writes_a_png(tmp_path):
    records = RunRecords(tmp_path)
    records.add_log({"step": 1, "loss": 2.0})
    records.add_log({"step": 2, "event": "skipped", "loss": "nan"})
    records.add_summary({"epoch": 0, "train_loss": 1.5, "eval_loss": 1.2, "eval_top1": 40.0, "lr": 0.1})
    records.plot()
    assert records.curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
