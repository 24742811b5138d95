"""The publish-after-checkpoint protocol, without JAX or MLflow."""

from glam.ledger import MetricLedger


class Writer:
    """A publisher that stores what it is handed only when told to (`store`)."""

    def __init__(self):
        self.handed, self.stored, self.confirmed = [], [], 0

    def __call__(self, entries):
        self.handed.append(list(entries))
        return len(self.handed)

    def store(self):
        self.stored = [p for batch in self.handed for p in batch]
        self.confirmed = len(self.handed)


def test_points_are_published_only_after_the_checkpoint_covering_them_completes():
    writer = Writer()
    ledger = MetricLedger()
    for step in range(3):
        ledger.record(step, {"loss": step})
    for step, metrics in ledger.take_unchecked():
        ledger.verify(step, metrics)
    assert ledger.unchecked == []
    carried = ledger.checkpoint(writer, writer.confirmed)  # checkpoint at step 3 written now
    assert writer.handed == [[]] and [s for s, _ in carried] == [0, 1, 2]
    ledger.verify(3, {"loss": 3})
    ledger.checkpoint(writer, writer.confirmed)  # the step-3 checkpoint is complete
    assert [s for s, _ in writer.handed[-1]] == [0, 1, 2]
    ledger.publish_all(writer)
    writer.store()
    assert [s for s, _ in writer.stored] == [0, 1, 2, 3]


def test_points_handed_to_the_writer_stay_in_every_record_until_it_confirms_them():
    """An outage: the writer holds batches back; the checkpoint records keep carrying them, so
    a crash or a writer that gives up loses none."""
    writer = Writer()
    ledger = MetricLedger()
    for step in range(6):
        ledger.verify(step, {"loss": step})
        carried = ledger.checkpoint(writer, writer.confirmed)
    assert [s for s, _ in carried] == list(range(6))  # nothing confirmed yet: all carried
    writer.store()
    ledger.verify(6, {"loss": 6})
    carried = ledger.checkpoint(writer, writer.confirmed)
    assert [s for s, _ in carried] == [5, 6]  # 5: handed over just now; 6: newly durable


def test_a_rollback_forgets_newer_points_and_keeps_the_checkpoints_unpublished_ones():
    ledger = MetricLedger()
    ledger.record(5, {"loss": 1.0})
    ledger.verify(4, {"loss": 2.0})
    ledger.restart_from([(2, {"loss": 3.0})])
    assert ledger.unchecked == [] and ledger.verified == []
    writer = Writer()
    ledger.publish_all(writer)
    assert writer.handed == [[(2, {"loss": 3.0})]]


def test_without_checkpoints_verified_points_are_published_in_batches():
    writer = Writer()
    ledger = MetricLedger()
    ledger.verify(0, {"loss": 1.0})
    ledger.publish_verified(writer)
    assert writer.handed == [[(0, {"loss": 1.0})]] and ledger.verified == []

