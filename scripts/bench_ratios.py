#!/usr/bin/env python3
"""Summarise the `kernels` and `options` criterion benchmarks as Markdown tables of medians and
ratios.

Usage:
    cargo bench --bench kernels        # and/or: cargo bench --bench options
    python3 scripts/bench_ratios.py [--criterion-dir DIR] [--group REGEX]

Reads every `<group>/<function>/.../new/benchmark.json` and the `estimates.json` beside it
under criterion's output directory: `$CARGO_TARGET_DIR/criterion` when CARGO_TARGET_DIR is
set, else `target/criterion` (relative to the current directory), unless --criterion-dir says
otherwise.

For each `kernels` group (one shape N x K, named `NxK`, ordered by size) it prints a table with,
for every function:

- the median time per call (criterion's `median.point_estimate`),
- elements per ns (N*K / median ns; the group's `Throughput::Elements`),
- x memcpy: median / median of the group's `memcpy` (how many memcpys of the same bytes),
- speed-up: median of the reference / this median, where the reference is `forward/reference`
  for `forward/*` rows and `forward_backward/reference` for `forward_backward*/*` rows
  ("-" when the group has no reference measurement).

For each `options` group (`options_NxK`: the cost of each loss option, `pieces_NxK`: vocabulary
pieces), printed after the kernels groups, it prints for every function:

- the median time per call and elements per ns, as above,
- x memcpy: median / median of the group's `memcpy`,
- x plain (options groups) or x unsplit (pieces groups): median / median of the group's
  `fb/plain` or `fb/unsplit`, the same call without the option or without the split.

Only the Python 3 standard library is used. Medians and ratios only: on a shared, noisy
machine a single absolute figure means little.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

FUNCTION_ORDER = ["memcpy", "forward", "forward_backward", "forward_backward_in_place"]
VARIANT_ORDER = ["auto", "avx512", "avx2", "portable", "reference"]

# The `options` bench's groups: (group name prefix, baseline row, its column title, row order).
OPTION_KINDS = {
    "options": (
        "fb/plain",
        "x plain",
        [
            "memcpy",
            "fb/plain",
            "fb/plain_with",
            "fb/class_weights",
            "fb/target_weights",
            "fb/z_loss",
            "fb/softcap",
            "fb/logit_scale",
            "fb/class_mask",
            "fb/upstream",
            "fb/soft_targets",
            "fb/extras",
            "fb/ignore_index",
            "fb/all",
            "fb/all_softcap",
        ],
    ),
    "pieces": (
        "fb/unsplit",
        "x unsplit",
        ["memcpy", "fb/unsplit", "fb/pieces1", "fb/pieces8", "fb/pieces8_in_place"],
    ),
}


def default_dir():
    target = os.environ.get("CARGO_TARGET_DIR") or "target"
    return Path(target) / "criterion"


def load(criterion_dir):
    """{group: {"elements": n, "rows": {name: median_ns}}} from criterion's `new` results."""
    groups = {}
    for bench_file in sorted(criterion_dir.rglob("new/benchmark.json")):
        estimates_file = bench_file.with_name("estimates.json")
        if not estimates_file.is_file():
            continue
        with open(bench_file, encoding="utf-8") as f:
            bench = json.load(f)
        with open(estimates_file, encoding="utf-8") as f:
            estimates = json.load(f)
        group = bench.get("group_id")
        name = "/".join(p for p in (bench.get("function_id"), bench.get("value_str")) if p)
        if not group or not name:
            continue
        throughput = bench.get("throughput") or {}
        elements = throughput.get("Elements") or throughput.get("ElementsAndBytes", {}).get(
            "elements"
        )
        entry = groups.setdefault(group, {"elements": elements, "rows": {}})
        if entry["elements"] is None:
            entry["elements"] = elements
        entry["rows"][name] = estimates["median"]["point_estimate"]
    return groups


def sort_key(name):
    function, _, variant = name.partition("/")
    f = FUNCTION_ORDER.index(function) if function in FUNCTION_ORDER else len(FUNCTION_ORDER)
    v = VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER)
    return (f, function, v, variant)


def fmt_time(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def fmt_ratio(x):
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def option_kind(group):
    """The `OPTION_KINDS` key of an `options` bench group (`options_NxK`, `pieces_NxK`), else None."""
    prefix, sep, _ = group.partition("_")
    return prefix if sep and prefix in OPTION_KINDS else None


def shape_title(group):
    kind = option_kind(group)
    shape = group[len(kind) + 1 :] if kind else group
    m = re.fullmatch(r"(\d+)x(\d+)", shape)
    if not m:
        return group
    title = f"[{m.group(1)}×{m.group(2)}]"
    return f"{kind} {title}" if kind else title


def group_order(item):
    """Kernels groups first, then options, then pieces; by size within each."""
    group, entry = item
    kind = option_kind(group)
    rank = 0 if kind is None else 1 + list(OPTION_KINDS).index(kind)
    return (rank, entry["elements"] or 0, group)


def title_line(group, elements):
    title = shape_title(group)
    if elements:
        title += f", {elements:,} elements"
    return f"### {title}"


def option_table(group, entry):
    baseline_name, baseline_title, order = OPTION_KINDS[option_kind(group)]
    rows = entry["rows"]
    elements = entry["elements"]
    memcpy = rows.get("memcpy")
    baseline = rows.get(baseline_name)
    lines = [
        title_line(group, entry["elements"]),
        "",
        f"| function | median | elements/ns | x memcpy | {baseline_title} |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    known = {name: i for i, name in enumerate(order)}
    for name in sorted(rows, key=lambda n: (known.get(n, len(order)), n)):
        ns = rows[name]
        per_ns = f"{elements / ns:.3g}" if elements and ns > 0 else "-"
        vs_memcpy = ns / memcpy if memcpy else None
        vs_baseline = ns / baseline if baseline and name != "memcpy" else None
        lines.append(
            f"| `{name}` | {fmt_time(ns)} | {per_ns} | {fmt_ratio(vs_memcpy)} "
            f"| {fmt_ratio(vs_baseline)} |"
        )
    return "\n".join(lines)


def table(group, entry):
    if option_kind(group):
        return option_table(group, entry)
    rows = entry["rows"]
    elements = entry["elements"]
    memcpy = rows.get("memcpy")
    references = {
        "forward": rows.get("forward/reference"),
        "forward_backward": rows.get("forward_backward/reference"),
        "forward_backward_in_place": rows.get("forward_backward/reference"),
    }
    lines = [
        title_line(group, elements),
        "",
        "| function | median | elements/ns | x memcpy | speed-up vs reference |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in sorted(rows, key=sort_key):
        ns = rows[name]
        function, _, variant = name.partition("/")
        per_ns = f"{elements / ns:.3g}" if elements and ns > 0 else "-"
        vs_memcpy = ns / memcpy if memcpy else None
        reference = references.get(function)
        speedup = reference / ns if reference and variant != "reference" else None
        lines.append(
            f"| `{name}` | {fmt_time(ns)} | {per_ns} | {fmt_ratio(vs_memcpy)} "
            f"| {fmt_ratio(speedup)} |"
        )
    return "\n".join(lines)


def main(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--criterion-dir",
        type=Path,
        default=None,
        help="criterion's output directory (default: $CARGO_TARGET_DIR/criterion, "
        "else target/criterion)",
    )
    parser.add_argument(
        "--group", default=None, help="only groups whose name matches this regex (re.search)"
    )
    args = parser.parse_args(argv)
    criterion_dir = args.criterion_dir or default_dir()
    if not criterion_dir.is_dir():
        print(f"no criterion results in {criterion_dir}: run `cargo bench --bench kernels` "
              "(or `--bench options`) first", file=sys.stderr)
        return 1
    groups = load(criterion_dir)
    if args.group:
        groups = {g: e for g, e in groups.items() if re.search(args.group, g)}
    if not groups:
        print(f"no benchmark results found under {criterion_dir}", file=sys.stderr)
        return 1
    ordered = sorted(groups.items(), key=group_order)
    print("\n\n".join(table(group, entry) for group, entry in ordered))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
