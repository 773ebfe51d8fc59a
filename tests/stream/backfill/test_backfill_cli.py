"""`chorus backfill` start-up checks, before anything connects: input files (a malformed DIDs
file, a graph file with missing columns or a bad DID deep inside it, with the line number) and
the URLs given (a PLC directory, relay or PDS on a non-public address without --allow-net) are
one-line `chorus: error: ...` lines with a non-zero exit. Kafka here is a port nobody listens on
(or none is configured), so reaching Kafka first would give a different error. The cases run the
command in-process (tests/helpers/cli.py); the last one, which goes on to Kafka, runs the real
`chorus` subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream.backfill.fetch import parse_networks, refused_addresses
from stream.backfill.graph_file import BATCH_ROWS
from stream.local.broker import free_port
from tests.helpers.cli import invoke

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[3]
GOOD = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"


def backfill(tmp_path: Path, *args: str, kafka: bool = True, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """`chorus backfill --no-progress [--kafka DEAD] ARGS` in-process (``subprocess_``: the real command)."""
    env = dict(CHORUS_STATE_DIR=str(tmp_path / "state"), CHORUS_METRICS_PORT="0")
    dead_kafka = ["--kafka", f"kafka://127.0.0.1:{free_port()}"] if kafka else []
    args = ("backfill", "--no-progress", *dead_kafka, *args)
    if not subprocess_:
        return invoke(args, env)
    env.update({k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")})
    return subprocess.run([sys.executable, "-m", "stream.cli", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)


def one_line_error(r: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chorus: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_input_files_are_checked_before_kafka(tmp_path):
    dids = tmp_path / "dids.txt"
    dids.write_text(f"{GOOD}\n# a comment\n\nnot-a-did\n")
    for kafka in (True, False):  # Kafka unreachable, or not configured at all
        one_line_error(backfill(tmp_path, "--dids", str(dids), kafka=kafka), "line 4", "not-a-did")
    csv = tmp_path / "graph.csv"
    csv.write_text(f"follower,subject\n{GOOD},did:plc:b\n")
    one_line_error(backfill(tmp_path, "--graph-file", str(csv), kafka=False), "lacks column(s) followed")
    # a bad DID past the first batch of rows (the importer reads batches of BATCH_ROWS): the whole
    # file is checked before anything is published
    bad_line = BATCH_ROWS + 500
    rows = [f"did:plc:f{i:022d},did:plc:s{i:022d}\n" for i in range(bad_line - 2)]
    csv.write_text("follower,followed\n" + "".join(rows) + f"{GOOD},did:web:\n" + rows[0])
    one_line_error(backfill(tmp_path, "--graph-file", str(csv)), f"line {bad_line}", "followed is not a DID")
    # a header and no pairs: an error, as a --dids file without DIDs (not a silent import of nothing)
    csv.write_text("follower,followed\n")
    one_line_error(backfill(tmp_path, "--graph-file", str(csv)), str(csv), "no follow pairs")
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = tmp_path / "graph.parquet"
    pq.write_table(pa.table({"follower": pa.array([], pa.string()), "followed": pa.array([], pa.string())}), empty)
    one_line_error(backfill(tmp_path, "--graph-file", str(empty), kafka=False), "no follow pairs")
    # --plc-export where no DID is resolved
    one_line_error(backfill(tmp_path, "--pds", "https://pds.example.com", "--plc-export"), "--plc-export", "--pds")


def test_a_non_public_url_without_allow_net_is_refused_at_start(tmp_path):
    dids = tmp_path / "dids.txt"
    dids.write_text(GOOD + "\n")
    port = free_port()
    for host, ip in (("127.0.0.1", "127.0.0.1"), ("localhost", None)):  # a literal, and a name resolved
        url = f"http://{host}:{port}"
        line = one_line_error(backfill(tmp_path, "--dids", str(dids), "--plc", url),
                              f"--plc {url}", "non-public address", "--allow-net")
        assert ip is None or ip in line
        one_line_error(backfill(tmp_path, "--relay", url, "--plc", "https://plc.directory"),
                       f"--relay {url}", "non-public address", "--allow-net")
        one_line_error(backfill(tmp_path, "--pds", url), f"--pds {url}", "--allow-net")
    # allowed: the check passes and the run goes on to Kafka (unreachable here: its own one line,
    # without aiokafka's log line per failed dial, on the real process's stderr)
    r = backfill(tmp_path, "--dids", str(dids), "--plc", f"http://127.0.0.1:{port}", "--allow-net", "127.0.0.0/8",
                 subprocess_=True)
    one_line_error(r, "cannot reach Kafka", code=1)


def test_refused_addresses():
    loopback = parse_networks(["127.0.0.0/8", "::1"])
    assert refused_addresses("http://127.0.0.1:5", []) == ["127.0.0.1"]
    assert refused_addresses("http://10.1.2.3", []) == ["10.1.2.3"]
    assert refused_addresses("http://[fe80::1]:80", []) == ["fe80::1"]
    assert refused_addresses("http://127.0.0.1:5", loopback) == []
    assert refused_addresses("http://localhost:5", loopback) == []
    assert set(refused_addresses("http://localhost:5", [])) <= {"127.0.0.1", "::1"}
    assert refused_addresses("http://localhost:5", []) != []
    assert refused_addresses("https://8.8.8.8", []) == []  # public
    assert refused_addresses("https://no-such-host.invalid", []) == []  # unresolvable: left to the first request
