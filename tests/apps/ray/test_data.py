"""Batch embedding on Ray Data, on a real 2-node cluster: the same rows as in one process, every node
working, a worker killed mid-job costing no row, the corpus cut into blocks of equal work each embedded
in one call, and one-line refusals."""

from __future__ import annotations

import collections
import gc
import pickle
import threading
import time

import numpy as np
import pytest

from conftest import TESTDATA, model_path
from poprt_lite.apps.corpus import Corpus, embed_in_process, read_corpus
from poprt_lite.apps.embed import Embedder
from poprt_lite.cli.main import main

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from poprt_lite.apps.ray.data import EmbedBatches, ShippedEmbedder, corpus_blocks, embed_dataset, iter_embedded, user_error  # noqa: E402

MODEL = str(model_path("st_mean_norm_torchscript"))
TOKENIZER = str(TESTDATA / "tiny_tokenizer.json")
ROWS = 10_000
BATCH = 250  # 40 batches: enough for both actors to work, and for a kill to land mid-job
WORKER = f"MapWorker(MapBatches({EmbedBatches.__name__}))"
WORDS = "the a man woman is eating riding food horse of tiny tokenizer hello world sentence long enough x".split()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """10,000 sentences of 1 to 30 words in Parquet, ids that are not row numbers."""
    rng = np.random.default_rng(25)
    sentences = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 31)))) for _ in range(ROWS)]
    ids = [f"doc-{i:05d}" for i in rng.permutation(ROWS)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.parquet"
    pq.write_table(pa.table({"id": ids, "text": sentences}), path)
    return path


@pytest.fixture(scope="module")
def in_process(corpus_file):
    """The in-process result: ids and embeddings, in order."""
    corpus = read_corpus(corpus_file, "text", "id")
    rows = pa.concat_tables(embed_in_process(Embedder.open(MODEL, TOKENIZER), corpus))
    return rows.column("id").to_pylist(), vectors_of(rows)


def mixed_corpus(rows: int) -> Corpus:
    """`rows` texts as a search corpus mixes them: 90% of 1 to 30 words, 10% paragraphs of 60 to 300."""
    rng = np.random.default_rng(rows)
    lengths = np.where(rng.random(rows) < 0.1, rng.integers(60, 301, rows), rng.integers(1, 31, rows))
    texts = [" ".join(rng.choice(WORDS, size=int(n))) for n in lengths]
    return Corpus(TESTDATA / "mixed", pa.table({"id": np.arange(rows), "text": texts}), "text", "id")


def work_of(table) -> np.ndarray:
    """Each row's work as `corpus_blocks` counts it: its characters plus one."""
    return np.array([len(text) + 1 for text in table.column("text").to_pylist()])


def vectors_of(table) -> np.ndarray:
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def assert_same_rows(got_ids, got, want_ids, want):
    assert len(got_ids) == len(want_ids) == ROWS and len(set(got_ids)) == ROWS  # every row once
    assert got_ids == want_ids  # in the input's order
    cosine = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.99999


def finished_batches_per_node(cluster) -> collections.Counter:
    from ray.util.state import list_tasks

    tasks = list_tasks(address=cluster.address, filters=[("name", "=", f"{WORKER}.submit"), ("state", "=", "FINISHED")], limit=10_000, raise_on_missing_output=False)
    return collections.Counter(t.node_id for t in tasks)


def test_the_shipped_embedder_opens_as_the_driver_s():
    embedder = Embedder.open(MODEL, TOKENIZER)
    shipped = pickle.loads(pickle.dumps(ShippedEmbedder.of(embedder)))  # as through the object store
    opened = shipped.open(threads=1)
    assert (opened.output, opened.max_length, opened.dimension) == (embedder.output, embedder.max_length, embedder.dimension)
    sentences = ["hello world", "", "a sentence long enough to be cut at the tokenizer limit of twenty four tokens by truncation"]
    np.testing.assert_array_equal(opened.embed(sentences), embedder.embed(sentences))


@pytest.mark.parametrize("workers, count", [(2, 10), (3, 12)])
def test_the_corpus_is_cut_into_blocks_of_equal_work_a_multiple_of_the_workers(workers, count):
    corpus = mixed_corpus(10_000)
    blocks = corpus_blocks(corpus, 1024, workers)
    assert len(blocks) == count  # as many as blocks of 1024 rows, rounded up to a multiple of the workers
    assert pa.concat_tables(blocks).equals(corpus.table)  # every row once, in order
    work, largest = work_of(corpus.table).sum(), work_of(corpus.table).max()
    assert all(abs(work_of(block).sum() - work / count) < largest for block in blocks), [work_of(block).sum() for block in blocks]


@pytest.mark.parametrize("rows, workers, rows_per_block", [(2049, 2, [513, 512, 512, 512]), (2048, 3, [683, 683, 682]), (5, 2, [3, 2]), (3, 4, [1, 1, 1])])
def test_the_block_count_rounds_up_to_the_workers_with_at_most_one_block_per_row(rows, workers, rows_per_block):
    corpus = Corpus(TESTDATA / "even", pa.table({"text": ["same text"] * rows}), "text", None)
    assert [block.num_rows for block in corpus_blocks(corpus, 1024, workers)] == rows_per_block


def test_a_row_with_more_work_than_a_share_takes_the_place_of_the_blocks_it_spans():
    corpus = Corpus(TESTDATA / "long", pa.table({"text": ["x" * 1000, "a", "b", "c"]}), "text", None)
    blocks = corpus_blocks(corpus, batch_size=1, workers=4)  # 4 shares of 1007: the long row spans 3 of them
    assert [block.column("text").to_pylist() for block in blocks] == [["x" * 1000], ["a", "b", "c"]]


@pytest.mark.slow
def test_each_block_is_embedded_in_one_call(cluster):
    corpus = mixed_corpus(400)
    blocks = corpus_blocks(corpus, batch_size=50, workers=2)
    tables = list(iter_embedded(corpus, Embedder.open(MODEL, TOKENIZER), workers=2, batch_size=50))
    # one embedded table per block, in order (preserve_order): no call split or merged blocks
    assert [t.num_rows for t in tables] == [b.num_rows for b in blocks] and len(blocks) == 8
    assert pa.concat_tables(tables).column("id").to_pylist() == list(range(400))


@pytest.mark.slow
def test_two_nodes_embed_the_corpus_as_one_process_does(cluster, corpus_file, in_process, tmp_path, capsys):
    before = finished_batches_per_node(cluster)
    out = tmp_path / "out"
    code = main(["embed", MODEL, "--tokenizer", TOKENIZER, "--input", str(corpus_file), "--output", str(out), "--id_column", "id",
                 "--ray", cluster.address, "--workers", "2", "--batch_size", str(BATCH)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert stdout == f"{ROWS} rows -> {out}/ (columns 'id' and 'embedding': 64 float32 each, output 'sentence_embedding')\n"
    rows = pq.read_table(out)
    assert rows.schema.names == ["id", "embedding"] and str(rows.schema.field("embedding").type) == "fixed_size_list<element: float>[64]"
    assert_same_rows(rows.column("id").to_pylist(), vectors_of(rows), *in_process)
    # Both nodes ran batches (task events reach the state API within a few seconds).
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    deadline = time.monotonic() + 60
    while True:
        done = finished_batches_per_node(cluster) - before
        if sum(done.values()) >= ROWS // BATCH or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert set(done) == nodes and len(nodes) == 2 and sum(done.values()) >= ROWS // BATCH, done


@pytest.mark.slow
def test_a_worker_killed_mid_job_costs_time_not_rows(cluster, corpus_file, in_process):
    from ray.util.state import list_actors

    corpus = read_corpus(corpus_file, "text", "id")
    earlier = {actor.actor_id for actor in list_actors(address=cluster.address, filters=[("class_name", "=", WORKER)])}  # other tests' pools
    tables, failure = [], []

    def consume():
        try:
            tables.extend(iter_embedded(corpus, Embedder.open(MODEL, TOKENIZER), workers=2, batch_size=BATCH))
        except BaseException as exc:  # reported by the assertions below
            failure.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    deadline = time.monotonic() + 120
    alive: list = []
    while len(alive) < 2 and consumer.is_alive() and time.monotonic() < deadline:
        alive = [a for a in list_actors(address=cluster.address, filters=[("class_name", "=", WORKER), ("state", "=", "ALIVE")], detail=True) if a.actor_id not in earlier]
    assert len(alive) == 2, "the job's two actors never came up"
    victim = alive[0]
    # The pool's handles live in this process (Ray Data's executor is the driver): kill one, restart allowed.
    handle = next(o for o in gc.get_objects() if isinstance(o, ray.actor.ActorHandle) and o._ray_actor_id.hex() == victim.actor_id)
    done_at_kill = len(tables)
    ray.kill(handle, no_restart=False)
    consumer.join(timeout=300)
    assert not consumer.is_alive() and not failure, failure
    assert done_at_kill < ROWS // BATCH  # the kill landed mid-job
    (after,) = list_actors(address=cluster.address, filters=[("actor_id", "=", victim.actor_id)], detail=True)
    assert after.num_restarts >= 1  # Ray started the killed worker again
    rows = pa.concat_tables(tables)
    assert_same_rows(rows.column("id").to_pylist(), vectors_of(rows), *in_process)


@pytest.mark.slow
@pytest.mark.parametrize(
    "columns, message",
    [
        ({"text": [1, 2]}, "column 'text' holds int64 values, not text; pass column with the column that holds the text"),
        ({"text": ["a", None]}, "column 'text' holds a null, not text; give every row a string (the empty one for no text)"),
        ({"body": ["a"]}, "the dataset has no column 'text'; its columns are: body"),
    ],
)
def test_a_dataset_without_text_fails_with_the_worker_s_one_line(cluster, columns, message):
    ds = ray.data.from_arrow(pa.table(columns))
    ds.context.raise_original_map_exception = True  # the worker's exception on the driver, as user_error reads it
    embedded = embed_dataset(ds, MODEL, TOKENIZER, workers=1)
    with pytest.raises(Exception) as err:
        embedded.take_all()
    assert str(user_error(err.value)) == message


@pytest.mark.parametrize(
    "address, message",
    [
        ("127.0.0.1:1", "error: cannot reach the Ray cluster at '127.0.0.1:1' (Connection refused); check the head's address (`ray start` prints it on the head) or pass --ray local\n"),
        ("ray://127.0.0.1:1", "error: cannot reach the Ray cluster at 'ray://127.0.0.1:1' (Connection refused); check the head's address (`ray start` prints it on the head) or pass --ray local\n"),
        ("head-node", "error: 'head-node' is not a Ray address; pass --ray auto, local, HOST:PORT of the cluster's head or ray://HOST:PORT\n"),
        ("local --batch_size 0", "error: --batch_size must be >= 1, got 0\n"),
    ],
)
def test_a_bad_ray_address_or_count_is_refused_at_once(tmp_path, capsys, address, message):
    (tmp_path / "c.txt").write_text("hello\n")
    code = main(["embed", MODEL, "--tokenizer", TOKENIZER, "--input", str(tmp_path / "c.txt"), "--output", str(tmp_path / "out"), "--ray", *address.split()])
    stdout, err = capsys.readouterr()
    assert (code, stdout, err) == (2, "", message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]
