"""The bookkeeping of scripts/gpu_check.sh (standard library only, so it runs even where torch is
broken):

    gpu_check_report.py counts JUNIT_DIR
        "passed failed errors skipped" summed over the step's pytest XML files ("- - - -": none)
    gpu_check_report.py summary OUT WORK STEP...
        OUT/summary.md from WORK/steps.tsv (one row per finished step: name, status, seconds,
        limit, counts, note) and OUT/device.txt; STEP... in order, those without a row "pending";
        OUT/junit.xml: every step's pytest XML merged into one <testsuites>.
"""

import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

COUNT_KEYS = ("passed", "failed", "errors", "skipped")


def junit_suites(junit_dir: Path) -> list[ET.Element]:
    suites = []
    for path in sorted(junit_dir.glob("*.xml")):
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError:  # a pytest killed while writing it
            continue
        suites += [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return suites


def counts(junit_dir: Path) -> str:
    suites = junit_suites(junit_dir)
    if not suites:
        return "- - - -"
    total, failed, errors, skipped = (
        sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped"))
    return f"{total - failed - errors - skipped} {failed} {errors} {skipped}"


def device_facts(path: Path) -> dict[str, str]:
    """The `key: value` lines that the info step writes first in device.txt."""
    facts = {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(": ")
            if sep and key.isidentifier() and key not in facts:
                facts[key] = value.strip()
    return facts


def summary(out: Path, work: Path, steps: list[str]) -> None:
    rows = {}
    tsv = work / "steps.tsv"
    if tsv.exists():
        for line in tsv.read_text().splitlines():
            name, status, seconds, limit, step_counts, note = (line.split("\t") + [""] * 6)[:6]
            rows[name] = (status, seconds, limit, *step_counts.split(), note)
    facts = device_facts(out / "device.txt")
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    lines = [
        "# dsnt_cuda GPU check (scripts/gpu_check.sh)",
        "",
        f"- device: {facts.get('device') or 'unknown'}; driver {facts.get('driver') or 'unknown'}",
        f"- torch: {facts.get('torch', 'unknown')}; CUDA {facts.get('cuda', 'unknown')}; "
        f"triton {facts.get('triton', 'unknown')}; python {facts.get('python', 'unknown')}",
        f"- date: started {facts.get('date', 'unknown')}, this summary {now}",
        f"- git: {facts.get('git', 'unknown')}",
        "",
        "| step | status | seconds | limit s | " + " | ".join(COUNT_KEYS) + " | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in steps:
        cells = rows.get(name, ("pending", "-", "-", "-", "-", "-", "-", ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    bad = [n for n in steps if n in rows and not rows[n][0].startswith(("ok", "skipped"))]
    pending = [n for n in steps if n not in rows]
    lines.append("")
    if bad:
        lines.append(f"**Not passed: {', '.join(bad)}.**")
    lines.append(f"**Still to run: {', '.join(pending)}.**" if pending else "All steps done.")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    merge_junit(work, out / "junit.xml")


def merge_junit(work: Path, target: Path) -> None:
    merged = ET.Element("testsuites")
    for step_dir in sorted(p for p in work.glob("junit-*") if p.is_dir()):
        for suite in junit_suites(step_dir):
            suite.set("name", f"{step_dir.name.removeprefix('junit-')}:{suite.get('name', 'pytest')}")
            merged.append(suite)
    if len(merged):
        ET.ElementTree(merged).write(target, encoding="utf-8", xml_declaration=True)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "counts":
        print(counts(Path(argv[1])))
        return 0
    if len(argv) >= 3 and argv[0] == "summary":
        summary(Path(argv[1]), Path(argv[2]), argv[3:])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
