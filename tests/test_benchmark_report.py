"""The report's target verdicts and tables, on fabricated records: the GPU suite's code runs
only on a GPU, so its bookkeeping is checked here."""

from __future__ import annotations

from benchmarks import report


def _rec(impl, n, ms, extra_gb, d=1024, error=None):
    if error:
        return dict(impl=impl, n=n, d=d, dtype="bfloat16", error=error)
    return dict(impl=impl, n=n, d=d, dtype="bfloat16", seconds=ms / 1e3,
                extra_bytes=int(extra_gb * 1e9), tflops=8 * n * n * d / (ms / 1e3) / 1e12)


def _gpu_records(huge=None):
    recs = []
    for n in (4096, 8192, 16384, 32768, 65536):
        f = (n / 65536) ** 2
        recs += [_rec("eager", n, 140 * f, 40 * f), _rec("compile", n, 70 * f, 20 * f),
                 _rec("infcl", n, 900 * f, 0.3 * n / 65536),
                 _rec("fastcl-triton", n, 50 * f, 0.4 * n / 65536),
                 _rec("fastcl-cuda", n, 0, 0, error="out of memory")]
    if huge is not None:
        recs.append(huge)
    return recs


def _verdicts(rows):
    return {t: v for t, _m, v in rows}


def test_gpu_targets_all_met_including_the_linear_memory_run():
    huge = _rec("fastcl-triton", report.LINEAR_N, 50 * 256, 0.4 * 16)
    rows = report.gpu_targets(_gpu_records(huge))
    v = _verdicts(rows)
    assert v["N = 65536, D = 1024 bf16: <= 60 ms"] == "met"
    assert v["N = 65536: <= 0.6 GB extra"] == "met"
    assert v["N = 65536: >= 2.5x faster than eager"] == "met"
    assert v["N = 65536: >= 1.0x faster than compile"] == "met"
    assert v["N = 4096: >= 10x faster than infcl"] == "met"
    linear = [r for r in rows if "1,048,576" in r[0]]
    assert len(linear) == 1 and linear[0][2] == "met"
    assert "x16.0 the extra memory" in linear[0][1]
    table = report.targets_table(rows)
    assert table.count("\n") == len(rows) + 1


def test_gpu_targets_not_met_and_missing():
    recs = _gpu_records(_rec("fastcl-triton", report.LINEAR_N, 0, 0, error="out of memory"))
    slow = [dict(r, seconds=r["seconds"] * 3) if r["impl"] == "fastcl-triton" and "seconds" in r
            else r for r in recs]
    v = _verdicts(report.gpu_targets(slow))
    assert v["N = 65536, D = 1024 bf16: <= 60 ms"].startswith("not met (2.50x")
    assert v["N = 65536: >= 2.5x faster than eager"] == "not met"
    linear = [t for t in v if "1,048,576" in t]
    assert v[linear[0]] == "not met"
    v = _verdicts(report.gpu_targets(_gpu_records()))
    assert v[linear[0]] == "unknown"


def test_gpu_markdown_lists_every_record():
    recs = _gpu_records(_rec("fastcl-triton", report.LINEAR_N, 50 * 256, 6.4))
    env = dict(date="2026-01-01", device="NVIDIA H100", torch="2.11", triton="3.6",
               fastcl="0.1.0")
    text = report.markdown(recs, env)
    assert text.count("\n| ") == len(recs) + 1  # and the header
    assert "out of memory" in text and "**fastcl-triton**" in text
