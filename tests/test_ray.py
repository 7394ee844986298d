"""The Ray engine (``--engine ray``) on a local Ray with 2 CPUs: same store, faults, resume, cache across engines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from conftest import ROOT, add_bad_files, interruptible, make_split_folder, processes_marked, tiny_settings
from pipeline import LayertapError
from pipeline.backbones.batchnorm import FOLDED
from pipeline.core.runtime import keras_backend
from pipeline.extraction.extract import extract_features
from pipeline.store.feature_store import FeatureStore
from pipeline.store.writing import StoreLockedError, store_lock

ray = pytest.importorskip("ray", reason="the Ray engine needs pip install 'layertap[ray]'")
ACTOR_TITLE = "ray::MapWorker(MapBatches(ShardWriter))"
TAPS = ("block1_pool", "block2_pool")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module (a run joins the Ray its process started): its address."""
    ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False, logging_level="error")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_split_folder(tmp_path_factory.mktemp("ray") / "splits", train=4, val=1, test=3)  # 24 images


def assert_same_store(a: FeatureStore, b: FeatureStore) -> None:
    assert a.key == b.key and a.rows.paths == b.rows.paths and a.skipped == b.skipped
    assert a.taps == b.taps
    for tap in a.taps:
        np.testing.assert_array_equal(a.features(tap), b.features(tap))  # bit for bit


@pytest.fixture(scope="module")
def local_store(data, tmp_path_factory) -> FeatureStore:
    return FeatureStore(extract_features(tiny_settings(data, tmp_path_factory.mktemp("local"))).store_path)


def test_ray_and_local_write_the_same_store_and_each_is_a_cache_hit_for_the_other(cluster, data, local_store,
                                                                                  tmp_path):
    made = extract_features(tiny_settings(data, tmp_path, engine="ray"))
    assert made.store_path.name == local_store.path.name and made.n_decoded == 24
    store = FeatureStore(made.store_path)
    assert_same_store(store, local_store)
    assert {info["engine"] for info in store.manifest.taps.values()} == {"ray"}
    assert not list(tmp_path.glob("*.parts")), "the shards are merged and removed"

    again = extract_features(tiny_settings(data, local_store.path.parent, engine="ray"))
    assert again.cache_hit and again.store_path == local_store.path
    assert extract_features(tiny_settings(data, tmp_path)).cache_hit  # the local engine reuses Ray's store


def test_the_actors_build_the_network_the_manifest_names_batchnorm_folded_or_not(cluster, data, tmp_path):
    """ResNet50: where the local engine folds BatchNormalization into the convolutions (TensorFlow), so do the
    actors, and the stores agree bit for bit (folded and as built differ in the last bits)."""
    settings = {"backbone": "resnet50", "layers": ("conv2_block3_out",)}
    local = FeatureStore(extract_features(tiny_settings(data, tmp_path / "local", **settings)).store_path)
    made = FeatureStore(extract_features(tiny_settings(data, tmp_path / "ray", engine="ray", **settings)).store_path)
    assert made.manifest.batchnorm == local.manifest.batchnorm == (FOLDED if keras_backend() == "tensorflow" else "")
    assert_same_store(made, local)


def test_an_actor_killed_mid_run_is_restarted_and_the_store_comes_out_identical(cluster, data, local_store,
                                                                                tmp_path):
    killed = {}

    def kill_the_model_actor_after_its_first_shard():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if list(tmp_path.glob("*.parts/*/shard-*.h5")):
                for pid in _processes_titled(ACTOR_TITLE):
                    os.kill(pid, signal.SIGKILL)
                    killed[pid] = len(list(tmp_path.glob("*.parts/*/shard-*.h5")))
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_model_actor_after_its_first_shard)
    killer.start()
    try:
        made = extract_features(tiny_settings(data, tmp_path, engine="ray", shard_size=2, batch_size=2))
    finally:
        killed.setdefault(0, -1)  # stops the thread if the run ended first
        killer.join()
    assert [n for pid, n in killed.items() if pid] and max(killed.values()) < 12, \
        f"the actor must be killed while shards remain: {killed}"
    assert_same_store(FeatureStore(made.store_path), local_store)


def test_bad_images_are_skipped_and_named_as_the_local_engine_names_them(cluster, tmp_path):
    folder = make_split_folder(tmp_path / "bad", train=2, val=1, test=1)
    expected = add_bad_files(folder / "train", "red")
    local = FeatureStore(extract_features(tiny_settings(folder, tmp_path / "local")).store_path)
    on_ray = FeatureStore(extract_features(tiny_settings(folder, tmp_path / "ray", engine="ray")).store_path)
    assert_same_store(on_ray, local)
    reasons = dict(on_ray.skipped)
    for name, fragment in expected.items():
        assert fragment in reasons[f"train/red/{name}"], reasons


def test_a_killed_driver_leaves_shards_that_the_next_run_resumes_from(cluster, data, local_store, tmp_path):
    """The driver joins the running cluster (--ray-address), is SIGKILLed, and a local run finishes the store."""
    out = tmp_path / "killed"
    args = ["extract", "--data", str(data), "--weights", "random", "--size", "32", "--layers", ",".join(TAPS),
            "--batch-size", "4", "--shard-size", "4", "-q", "--out", str(out), "--engine", "ray",
            "--ray-address", cluster]
    driver = subprocess.Popen([sys.executable, "-m", "pipeline", *args], env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not list(out.glob("*.parts/*/shard-*.h5")) and driver.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        driver.kill()
    finally:
        output = driver.communicate(timeout=30)[0]
    assert driver.returncode == -signal.SIGKILL, output[-2000:]
    assert not list(out.glob("*.h5")), "a killed run must leave no store that later stages accept"
    deadline = time.time() + 60  # Ray ends the dead driver's actors; one may commit the shard in hand first
    while _processes_titled(ACTOR_TITLE) and time.time() < deadline:
        time.sleep(0.1)
    committed = len(list(out.glob("*.parts/*/shard-*.h5")))
    assert 1 <= committed < 6

    resumed = extract_features(tiny_settings(data, out, batch_size=4))
    assert resumed.n_decoded == 24 - 4 * committed, "the rerun must decode only the uncommitted shards"
    assert_same_store(FeatureStore(resumed.store_path), local_store)


def test_a_large_scan_reads_and_hashes_on_the_cluster_with_the_local_results(cluster, tmp_path, monkeypatch):
    import pipeline.data.scan as scan_module
    import pipeline.extraction.engines.ray as ray_engine
    from pipeline.data.images import find_images
    from pipeline.data.scan import StatCache, scan_images

    folder = make_split_folder(tmp_path / "bad", train=2, val=1, test=1)
    add_bad_files(folder / "train", "red")
    here = scan_images(find_images(folder))
    monkeypatch.setattr(ray_engine, "RAY_SCAN_MIN_FILES", 1)
    monkeypatch.setattr(ray_engine, "PROBE_CHUNK", 5)  # 16 files: four tasks
    monkeypatch.setattr(scan_module, "read_file", lambda path, **kw: pytest.fail(f"read here: {path}"))
    cache = StatCache(tmp_path / "out", folder)
    with ray_engine.RaySession() as session:
        on_ray = scan_images(find_images(folder), cache=cache, remote=session.probe)
    assert on_ray == here
    assert len(StatCache(tmp_path / "out", folder)) == 16, "what the cluster read is in the stat cache"


def test_a_cache_hit_with_the_ray_engine_starts_no_ray(data, local_store, monkeypatch):
    import pipeline.extraction.engines.ray as ray_engine

    monkeypatch.setattr(ray_engine.RaySession, "get", lambda self: pytest.fail("Ray started for a cache hit"))
    assert extract_features(tiny_settings(data, local_store.path.parent, engine="ray")).cache_hit


def test_a_second_driver_on_one_store_is_refused_before_ray_starts(data, local_store, tmp_path):
    store_path = tmp_path / local_store.path.name
    with store_lock(store_path), pytest.raises(StoreLockedError, match="another process is extracting"):
        extract_features(tiny_settings(data, tmp_path, engine="ray"))


def test_the_command_starts_its_own_ray_and_stops_it(data, local_store, tmp_path):
    mark = f"layertap-ray-test-{os.getpid()}-{time.time()}"
    run = subprocess.run([sys.executable, "-m", "pipeline", "extract", "--data", str(data), "--weights", "random",
                          "--size", "32", "--layers", ",".join(TAPS), "--batch-size", "4", "--shard-size", "4",
                          "--out", str(tmp_path), "--engine", "ray", "-q"],
                         env={**os.environ, "PYTHONPATH": str(ROOT), "LAYERTAP_TEST_MARK": mark},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "computed" in run.stdout and "Traceback" not in run.stderr
    assert_same_store(FeatureStore(tmp_path / local_store.path.name), local_store)
    deadline = time.time() + 15
    while processes_marked(mark) and time.time() < deadline:
        time.sleep(0.2)
    assert not processes_marked(mark), "the Ray the command started must stop with it"


def test_a_gpu_decoder_decodes_in_the_model_actors_and_writes_the_local_engines_store(cluster, tmp_path,
                                                                                       monkeypatch, caplog):
    """``--decoder dali`` on Ray: no decoding tasks; each model actor decodes its shards as the local engine does
    (here on DALI's CPU device, which the driver's setting carries to the actors), bad files named alike."""
    pytest.importorskip("nvidia.dali")
    import pipeline.data.gpu_decode as gd
    import pipeline.extraction.engines.ray as ray_engine

    monkeypatch.setattr(gd, "DEVICE", "cpu")
    monkeypatch.setattr(ray_engine, "decode_shard", None)  # a decoding task would fail the run
    folder = make_split_folder(tmp_path / "bad", train=2, val=1, test=1)
    add_bad_files(folder / "train", "red")
    local = FeatureStore(extract_features(tiny_settings(folder, tmp_path / "local", decoder="dali")).store_path)
    with caplog.at_level("INFO", logger="pipeline.extraction.engines.ray"):
        made = extract_features(tiny_settings(folder, tmp_path / "ray", decoder="dali", engine="ray"))
    assert "decoding with dali in the actors" in caplog.text
    assert_same_store(FeatureStore(made.store_path), local)
    assert "truncated" in dict(local.skipped)["train/red/truncated.jpg"]


GPU_NODE = textwrap.dedent("""
    import logging, sys
    import ray
    import pipeline.data.gpu_decode as gd
    from conftest import tiny_settings
    from pipeline.extraction.extract import extract_features
    gd.DEVICE = "cpu"  # DALI's CPU device stands in for the GPU Ray hands the actor
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ray.init(num_cpus=2, num_gpus=1, object_store_memory=256 << 20, include_dashboard=False, logging_level="error")
    made = extract_features(tiny_settings(sys.argv[1], sys.argv[2], decoder="dali", engine="ray", workers=0))
    print("decoded", made.n_decoded)
    ray.shutdown()
""")


def test_a_gpu_decoders_actor_reserves_its_nodes_cpus_per_gpu_and_decodes_with_that_many_threads(data, tmp_path):
    """A Ray node with 2 CPUs and 1 GPU (declared; DALI's CPU device decodes): the one actor reserves both CPUs
    (so Ray schedules nothing else on them) and its DALI runs 2 threads, not one per core of the node."""
    pytest.importorskip("nvidia.dali")
    run = subprocess.run([sys.executable, "-c", GPU_NODE, str(data), str(tmp_path)],
                         env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "decoded 24" in run.stdout
    assert "decoding with dali in the actors (2 threads each), one model actor on each of 1 GPUs" in run.stderr


def test_gpu_actors_reserve_the_fewest_cpus_per_gpu_of_the_live_gpu_nodes():
    from pipeline.extraction.engines.ray import cpus_per_gpu

    def node(cpus, gpus=0, alive=True):
        return {"Alive": alive, "Resources": {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}}

    assert cpus_per_gpu([node(64, 8), node(16, 1), node(96), node(2, 2, alive=False)]) == 8
    assert cpus_per_gpu([node(96, 8)]) == 12
    assert cpus_per_gpu([node(4, 8)]) == 1 and cpus_per_gpu([node(8)]) == 1 and cpus_per_gpu([]) == 1


def test_a_gpu_decoder_on_a_ray_cluster_without_gpus_is_refused_with_the_way_out(cluster, data, tmp_path):
    with pytest.raises(LayertapError, match="this cluster has no GPU; use --decoder pillow"):
        extract_features(tiny_settings(data, tmp_path, decoder="dali", engine="ray"))
    with pytest.raises(ValueError, match="decoder='turbo' is not known"):
        tiny_settings(data, tmp_path, engine="ray", decoder="turbo")


def test_ctrl_c_stops_the_command_and_its_ray_and_keeps_the_committed_shards(data, tmp_path):
    mark = f"layertap-ray-ctrl-c-{os.getpid()}-{time.time()}"
    # Niced, so that on 2 busy cores this process still looks every 20 ms: the last 11 shards take well under
    # a second, and if it missed them the run would finish before the signal.
    run = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "pipeline", "extract", "--data", str(data),
                            "--weights", "random",
                            "--size", "32", "--layers", ",".join(TAPS), "--batch-size", "2", "--shard-size", "2",
                            "--out", str(tmp_path), "--engine", "ray", "-q"],
                           env={**os.environ, "PYTHONPATH": str(ROOT), "LAYERTAP_TEST_MARK": mark},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.time() + 120
    while not list(tmp_path.glob("*.parts/*/shard-*.h5")) and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert run.poll() is None, "the run ended before its first shard was seen"
    run.send_signal(signal.SIGINT)
    sent = time.time()
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and time.time() - sent < 10, err[-2000:]
    assert "committed extraction shards are kept" in err and "Traceback" not in err
    assert list(tmp_path.glob("*.parts/*/shard-*.h5")) and not list(tmp_path.glob("*.h5"))
    deadline = time.time() + 15
    while processes_marked(mark) and time.time() < deadline:
        time.sleep(0.2)
    assert not processes_marked(mark), "the Ray the command started must stop with it"


def test_without_ray_installed_the_message_says_how_to_get_it(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(LayertapError, match=r"pip install 'layertap\[ray\]'"):
        extract_features(tiny_settings(data, tmp_path, engine="ray"))


def _processes_titled(prefix: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if fh.read().startswith(prefix.encode()):
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_new_images_among_reused_ones_are_computed_on_ray_like_on_the_local_engine(cluster, tmp_path):
    from conftest import COLOURS, make_class_folder, photo

    data = make_class_folder(tmp_path / "data")
    extract_features(tiny_settings(data, tmp_path / "ray"))
    extract_features(tiny_settings(data, tmp_path / "local"))
    for c, colour in enumerate(COLOURS):
        photo(COLOURS[colour], seed=900 + c).save(data / colour / "img_00.jpg")
    on_ray = extract_features(tiny_settings(data, tmp_path / "ray", engine="ray"))
    local = extract_features(tiny_settings(data, tmp_path / "local"))
    assert on_ray.n_decoded == local.n_decoded == 3 and on_ray.n_reused == local.n_reused == 12
    assert_same_store(on_ray.store, local.store)


@pytest.fixture
def silent_port():
    """A port on this machine that takes no connection and never refuses one: a listening socket whose
    backlog is full, so the kernel drops every further SYN (as a firewall or an unroutable host does)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = [socket.socket() for _ in range(4)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(server.getsockname())
    time.sleep(0.2)
    yield f"127.0.0.1:{server.getsockname()[1]}"
    for sock in (*fillers, server):
        sock.close()


def test_a_malformed_ray_address_is_refused_with_the_settings():
    from pipeline.extraction.engines.ray import RayOptions

    with pytest.raises(ValueError, match=r"--ray-address head-without-port is not host:port \(e.g. head:6379"):
        RayOptions(address="head-without-port")
    assert RayOptions(address="ray://head:10001").address and RayOptions(address="auto").address


@pytest.mark.parametrize("address, reason", [("127.0.0.1:1", "(connection refused)"),
                                             ("SILENT", "(no answer within 0.5 s)")])
def test_a_ray_address_that_does_not_answer_is_one_line_in_seconds(tmp_path, silent_port, address, reason):
    """Ray retries an address that does not answer for good (127.0.0.1:1), or for 33 s and then a traceback.
    In a process of its own: one that has Ray running already (this module's cluster) uses that one."""
    address = silent_port if address == "SILENT" else address
    data = make_split_folder(tmp_path / "data", train=2, val=1, test=1)
    script = ("import sys\nfrom pipeline.extraction.engines import ray as engine\nengine.CONNECT_SECONDS = 0.5\n"
              "from pipeline.cli import main\nsys.exit(main(sys.argv[1:]))")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, "extract", "--data", str(data), "--out", str(tmp_path / "f"),
                           "--engine", "ray", "--ray-address", address, "--weights", "random", "--size", "32",
                           "--layers", "block1_pool", "-q"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    error = done.stderr.strip()
    assert done.returncode == 2 and f"--ray-address {address}" in error and reason in error, error
    assert len(error.splitlines()) == 1 and time.monotonic() - started < 60
