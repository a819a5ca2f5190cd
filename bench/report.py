#!/usr/bin/env python3
"""Aggregate bench/run.sh measurements into JSON + a text table + markdown.

usage: report.py MEASUREMENTS.jsonl OUT.json OUT.md

Each figure is the median over repetitions.  Only the standard library is used.
"""
import json
import os
import statistics
import sys

TARGETS = ["native", "asiffs", "qsd"]

# job -> (fio direction(s), metric, unit, description)
JOBS = {
    "fill":      (["write"], "bw", "MB/s", "seq write 1M qd16 direct, first pass (allocating)"),
    "seqwrite":  (["write"], "bw", "MB/s", "seq write 1M qd16 direct (overwrite)"),
    "seqread":   (["read"], "bw", "MB/s", "seq read 1M qd16 direct"),
    "randwrite": (["write"], "iops", "IOPS", "rand write 4k qd32 direct"),
    "randread":  (["read"], "iops", "IOPS", "rand read 4k qd32 direct"),
    "bufwrite":  (["write"], "bw", "MB/s", "seq write 1M buffered + end_fsync, 1 pass"),
    "bufread":   (["read"], "bw", "MB/s", "seq read 1M buffered, cold, 1 pass"),
    "mixed":     (["read", "write"], "iops", "IOPS", "randrw 70/30 16k qd16 direct fsync=64"),
}

MIB = 1024 * 1024


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def load_fio(path):
    with open(path) as f:
        text = f.read()
    # fio sometimes prefixes notes before the JSON document
    return json.loads(text[text.index("{"):])


def fio_metric(doc, dirs, metric):
    job = doc["jobs"][0]
    if job.get("error"):
        return None, None
    val = 0.0
    p99 = None
    for d in dirs:
        part = job[d]
        val += part["bw_bytes"] / 1e6 if metric == "bw" else part["iops"]
        pct = (part.get("clat_ns") or {}).get("percentile") or {}
        if "99.000000" in pct and p99 is None:
            p99 = pct["99.000000"] / 1000.0
    return val, p99


def fmt(v, unit=None):
    if v is None:
        return "n/a"
    if unit == "ratio":
        return f"{v:.2f}x"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def main():
    meas_path, out_json, out_md = sys.argv[1:4]
    rows = []
    with open(meas_path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    config = next((r for r in rows if r["kind"] == "config"), {})

    # ---- fio jobs
    per = {}  # (job, target) -> list of (value, p99)
    errors = []
    for r in rows:
        if r["kind"] == "fio_error":
            errors.append(f"fio {r['job']} on {r['target']} failed in rep {r['rep']}")
        if r["kind"] != "fio" or r["job"] not in JOBS:
            continue
        dirs, metric, _, _ = JOBS[r["job"]]
        try:
            v, p99 = fio_metric(load_fio(r["file"]), dirs, metric)
        except (OSError, ValueError, KeyError) as e:
            errors.append(f"cannot parse {r['file']}: {e}")
            continue
        per.setdefault((r["job"], r["target"]), []).append((v, p99))

    jobs = []
    for job, (dirs, metric, unit, desc) in JOBS.items():
        if not any((job, t) in per for t in TARGETS):
            continue
        entry = {"job": job, "unit": unit, "desc": desc, "runs": {}, "p99_clat_us": {}}
        for t in TARGETS:
            vals = per.get((job, t), [])
            entry["runs"][t] = [v for v, _ in vals]
            entry[t] = med([v for v, _ in vals])
            entry["p99_clat_us"][t] = med([p for _, p in vals])
        entry["asiffs_vs_native"] = ratio(entry["asiffs"], entry["native"])
        entry["asiffs_vs_qsd"] = ratio(entry["asiffs"], entry["qsd"])
        jobs.append(entry)

    # ---- discard
    discard = {}
    for t in TARGETS:
        rs = [r for r in rows if r["kind"] == "discard" and r["target"] == t]
        if not rs:
            continue
        ok = [r for r in rs if "error" not in r]
        d = {"runs": len(rs), "errors": [r["error"] for r in rs if "error" in r]}
        if ok:
            d["time_s"] = med([r["time_s"] for r in ok])
            d["punched_bytes"] = med([r["punched"] for r in ok])
            d["alloc_before_bytes"] = med([r["before"] for r in ok])
            d["alloc_after_bytes"] = med([r["after"] for r in ok])
            d["freed_bytes"] = med([r["before"] - r["after"] for r in ok
                                    if r["before"] is not None and r["after"] is not None])
            if d["freed_bytes"] is not None and d["punched_bytes"]:
                d["freed_fraction_of_punched"] = d["freed_bytes"] / d["punched_bytes"]
        discard[t] = d

    final = {}
    for t in TARGETS:
        xs = [r["bytes"] for r in rows if r["kind"] == "container_final" and r["target"] == t]
        if xs:
            final[t] = med(xs)

    # ---- extras
    rss = [r["vmhwm_kib"] for r in rows if r["kind"] == "rss" and r["vmhwm_kib"] is not None]
    rss_qsd = [r["vmhwm_kib"] for r in rows if r["kind"] == "rss_qsd" and r["vmhwm_kib"] is not None]
    peak_rss_mib = max(rss) / 1024 if rss else None
    qsd_rss_mib = max(rss_qsd) / 1024 if rss_qsd else None

    mm = [r.get("ms") for r in rows if r["kind"] == "mount_many"]
    mount_many = {"images": config.get("many"), "runs_ms": mm, "median_ms": med(mm)} if mm else None

    big = next((r for r in rows if r["kind"] == "big_image"), None)
    ob = [r for r in rows if r["kind"] == "open_big"]
    info_w = [r["ms"] for r in rows if r["kind"] == "info_warm"]
    info_c = [r["ms"] for r in rows if r["kind"] == "info_cold"]
    hf = next((r for r in rows if r["kind"] == "info_hyperfine"), None)
    hf_ms = None
    if hf:
        try:
            with open(hf["file"]) as f:
                hf_ms = json.load(f)["results"][0]["median"] * 1000
        except (OSError, ValueError, KeyError, IndexError):
            pass
    open_big = None
    if big or ob or info_w:
        open_big = {
            "virtual": config.get("big"),
            "mapped_chunks": config.get("bigchunks"),
            "container_alloc_bytes": big and big["bytes"],
            "fill_s": big and big["fill_s"],
            "fresh_mount_ms": med([r["mount_ms"] for r in ob]),
            "open_ms": med([r["open_us"] / 1000 for r in ob]),
            "open_first_read_ms": med([r["open_read_us"] / 1000 for r in ob]),
            "info_warm_ms": med(info_w),
            "info_cold_ms": med(info_c),
            "info_hyperfine_median_ms": hf_ms,
            "runs": len(ob),
        }

    conv = {}
    for tool in ("asiffs", "qemu"):
        rs = [r for r in rows if r["kind"] == "convert" and r["tool"] == tool]
        if rs:
            s = med([r["s"] for r in rs])
            conv[tool] = {"median_s": s, "runs_s": [r["s"] for r in rs],
                          "MBps": rs[0]["in_bytes"] / 1e6 / s if s else None,
                          "out_alloc_bytes": med([r["out_alloc"] for r in rs])}

    # ---- PASS/MISS checks
    jb = {j["job"]: j for j in jobs}
    checks = []

    def check(name, value, op, threshold, unit=""):
        if value is None:
            st = "N/A"
        else:
            st = "PASS" if (value >= threshold if op == ">=" else value < threshold) else "MISS"
        checks.append({"name": name, "value": value, "op": op, "threshold": threshold,
                       "unit": unit, "status": st})

    def jr(job, key):
        return jb.get(job, {}).get(key)

    check("seq 1M write asiffs/native", jr("seqwrite", "asiffs_vs_native"), ">=", 0.9, "x")
    check("seq 1M read asiffs/native", jr("seqread", "asiffs_vs_native"), ">=", 0.9, "x")
    for job, label in (("randwrite", "rand 4k write"), ("randread", "rand 4k read")):
        check(f"{label} asiffs/native", jr(job, "asiffs_vs_native"), ">=", 0.5, "x")
        check(f"{label} asiffs/qsd", jr(job, "asiffs_vs_qsd"), ">=", 1.5, "x")
    check("asiffs peak RSS (VmHWM)", peak_rss_mib, "<", 100, "MiB")
    check(f"mount {config.get('many')} images", mount_many and mount_many["median_ms"], "<", 1000, "ms")
    check(f"open {config.get('big')} image: open+1st read, fresh mount",
          open_big and open_big["open_first_read_ms"], "<", 10, "ms")
    check(f"open {config.get('big')} image: asiffs info (cold)",
          open_big and open_big["info_cold_ms"], "<", 10, "ms")
    cr = None
    if "asiffs" in conv and "qemu" in conv:
        cr = conv["qemu"]["median_s"] / conv["asiffs"]["median_s"]
    check("convert speed asiffs/qemu-img qcow2", cr, ">=", 1.0, "x")

    result = {
        "config": config,
        "jobs": jobs,
        "discard": discard,
        "container_final_alloc_bytes": final,
        "asiffs_peak_rss_mib": peak_rss_mib,
        "qsd_peak_rss_mib": qsd_rss_mib,
        "mount_many": mount_many,
        "open_big": open_big,
        "convert": conv,
        "convert_speed_ratio": cr,
        "checks": checks,
        "errors": errors,
        "elapsed_s": next((r["s"] for r in rows if r["kind"] == "elapsed"), None),
    }
    tmp = out_json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out_json)

    # ---- text + markdown
    hdr = ["job", "unit", "native", "asiffs", "qsd", "asiffs/native", "asiffs/qsd"]
    table = [hdr]
    for j in jobs:
        table.append([j["job"], j["unit"], fmt(j["native"]), fmt(j["asiffs"]), fmt(j["qsd"]),
                      fmt(j["asiffs_vs_native"], "ratio"), fmt(j["asiffs_vs_qsd"], "ratio")])
    if discard:
        for key, label, unit, scale in (("time_s", "discard 50% time", "s", 1),
                                        ("alloc_before_bytes", "discard alloc before", "MiB", MIB),
                                        ("alloc_after_bytes", "discard alloc after", "MiB", MIB)):
            vals = {t: (discard.get(t, {}).get(key)) for t in TARGETS}
            vals = {t: (v / scale if v is not None else None) for t, v in vals.items()}
            table.append([label, unit, fmt(vals["native"]), fmt(vals["asiffs"]), fmt(vals["qsd"]),
                          fmt(ratio(vals["asiffs"], vals["native"]), "ratio"),
                          fmt(ratio(vals["asiffs"], vals["qsd"]), "ratio")])

    widths = [max(len(r[i]) for r in table) for i in range(len(hdr))]
    lines = []
    for k, r in enumerate(table):
        lines.append("  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i])
                               for i, c in enumerate(r)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))

    cfg = (f"size={config.get('size')} runs={config.get('runs')} runtime={config.get('runtime')}s "
           f"ramp={config.get('ramp')}s quick={config.get('quick')} asiffs={config.get('asiffs_rev')} "
           f"kernel={config.get('kernel')} nproc={config.get('nproc')}")
    extra = []
    extra.append(f"asiffs peak RSS (VmHWM, max over reps): {fmt(peak_rss_mib)} MiB"
                 f"   (qsd: {fmt(qsd_rss_mib)} MiB)")
    if mount_many:
        extra.append(f"mount {mount_many['images']} images: median {fmt(mount_many['median_ms'])} ms "
                     f"(runs: {', '.join(fmt(x) for x in mount_many['runs_ms'])})")
    if open_big:
        ca = open_big["container_alloc_bytes"]
        extra.append(
            f"{open_big['virtual']} image, {open_big['mapped_chunks']} mapped chunks "
            f"(container {fmt(ca / MIB if ca else None)} MiB allocated): fresh mount "
            f"{fmt(open_big['fresh_mount_ms'])} ms, open {fmt(open_big['open_ms'])} ms, "
            f"open+1st read {fmt(open_big['open_first_read_ms'])} ms; asiffs info warm "
            f"{fmt(open_big['info_warm_ms'])} ms / cold {fmt(open_big['info_cold_ms'])} ms"
            + (f" (hyperfine {fmt(hf_ms)} ms)" if hf_ms else ""))
    for tool, c in conv.items():
        extra.append(f"convert {config.get('convert_size')} (~50% data) with {tool}: median "
                     f"{fmt(c['median_s'])} s = {fmt(c['MBps'])} MB/s, output "
                     f"{fmt(c['out_alloc_bytes'] / MIB if c['out_alloc_bytes'] else None)} MiB")
    def vu(c):
        return "n/a" if c["value"] is None else f"{fmt(c['value'])}{c['unit']}"

    chk = [f"{c['status']:4}  {c['name']}: {vu(c)} (target {c['op']} "
           f"{c['threshold']}{c['unit']})" for c in checks]

    print()
    print("asiffs benchmark  " + cfg)
    print("\n".join(lines))
    print()
    print("\n".join(extra))
    print()
    print("\n".join(chk))
    if errors:
        print("\nerrors:\n  " + "\n  ".join(errors))

    md = [f"<!-- generated by bench/run.sh; {cfg} -->",
          "| " + " | ".join(hdr) + " |",
          "|" + "|".join(["---"] * 2 + ["---:"] * 5) + "|"]
    for r in table[1:]:
        md.append("| " + " | ".join(r) + " |")
    md.append("")
    md.extend(f"- {e}" for e in extra)
    md.append("")
    md.append("| check | value | target | status |")
    md.append("|---|---:|---|---|")
    for c in checks:
        md.append(f"| {c['name']} | {vu(c)} | {c['op']} {c['threshold']}{c['unit']}"
                  f" | {c['status']} |")
    with open(out_md, "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
