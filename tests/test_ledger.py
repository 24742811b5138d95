"""The publish-after-checkpoint protocol, without JAX or MLflow."""

from glam.ledger import MetricLedger


def test_points_are_published_only_after_the_checkpoint_covering_them_completes():
    published = []
    ledger = MetricLedger()
    for step in range(3):
        ledger.record(step, {"loss": step})
    for step, metrics in ledger.take_unchecked():
        ledger.verify(step, metrics)
    assert ledger.unchecked == []
    carried = ledger.checkpoint(published.extend)  # checkpoint at step 3 written now
    assert published == [] and [s for s, _ in carried] == [0, 1, 2]
    ledger.verify(3, {"loss": 3})
    ledger.checkpoint(published.extend)  # the step-3 checkpoint is complete: 0..2 published
    assert [s for s, _ in published] == [0, 1, 2]
    ledger.publish_all(published.extend)
    assert [s for s, _ in published] == [0, 1, 2, 3]


def test_a_rollback_forgets_newer_points_and_keeps_the_checkpoints_unpublished_ones():
    published = []
    ledger = MetricLedger()
    ledger.record(5, {"loss": 1.0})
    ledger.verify(4, {"loss": 2.0})
    ledger.restart_from([(2, {"loss": 3.0})])
    assert ledger.unchecked == [] and ledger.verified == []
    ledger.publish_all(published.extend)
    assert published == [(2, {"loss": 3.0})]


def test_without_checkpoints_verified_points_are_published_in_batches():
    published = []
    ledger = MetricLedger()
    ledger.verify(0, {"loss": 1.0})
    ledger.publish_verified(published.extend)
    assert published == [(0, {"loss": 1.0})] and ledger.verified == []

