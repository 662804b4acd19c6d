import json

import torch

from torchmm_ext.engine.metric_logging import get_logger, MetricLogger


def test_metric_logger_files(tmp_path):
    with MetricLogger(tmp_path, enabled=True) as logger:
        logger.log_scalars("train", {"loss": torch.tensor(0.5), "lr": 1e-4}, step=3)
        logger.log_epoch(0, {"train": {"loss": 0.5}, "val": {"r1": torch.tensor(12.5)}}, step=3)
        logger.log_epoch(1, {"train": {"loss": 0.25}})
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [0, 1]
    assert lines[0]["val"]["r1"] == 12.5
    assert json.loads((tmp_path / "metrics_last.json").read_text())["train"]["loss"] == 0.25
    assert any((tmp_path / "tb").iterdir())


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricLogger(tmp_path / "run", enabled=False)
    logger.log_scalars("train", {"loss": 1.0}, 0)
    logger.log_epoch(0, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_get_logger_prints_once(capsys):
    log = get_logger("torchmm_ext.test")
    assert get_logger("torchmm_ext.test") is log
    log.info("hello %d", 3)
    out = capsys.readouterr().out
    assert out.count("hello 3") == 1 and "INFO torchmm_ext.test" in out
