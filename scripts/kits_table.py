"""JUnit XML files of `tests/test_sglang_kits.py` (the kits without speculation and with DFLASH; a later file
overrides an earlier one for the tests it holds, e.g. a rerun of a few tests after a fix) -> a markdown table
and the verdict: exit 1 if a test that passes without speculation does not pass with DFLASH.

    python scripts/kits_table.py runs/sglang_kits/TestKitsNoSpeculation.xml runs/sglang_kits/TestKitsDflash.xml
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

MODES = {"TestKitsNoSpeculation": "plain", "TestKitsDflash": "dflash"}


RANK = {"passed": 0, "skipped": 1, "FAILED": 2, "ERROR": 3}


def outcomes(paths: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {"plain": {}, "dflash": {}}
    for path in paths:
        this: dict[tuple[str, str], str] = {}  # pytest writes a second entry for an error at teardown: worst wins
        for case in ET.parse(path).getroot().iter("testcase"):
            mode = MODES.get(case.get("classname", "").rsplit(".", 1)[-1])
            if mode is None:
                continue
            kinds = {c.tag for c in case}
            result = "FAILED" if "failure" in kinds else "ERROR" if "error" in kinds else \
                "skipped" if "skipped" in kinds else "passed"
            key = (mode, case.get("name"))
            if key not in this or RANK[result] > RANK[this[key]]:
                this[key] = result
        for (mode, name), result in this.items():  # a later file replaces an earlier one's result
            out[mode][name] = result
    return out


def main(paths: list[str]) -> int:
    res = outcomes(paths)
    plain, dflash = res["plain"], res["dflash"]
    print("| kit test | no speculation | DFLASH |\n|---|---|---|")
    lost = []
    for name in sorted(set(plain) | set(dflash)):
        a, b = plain.get(name, "not run"), dflash.get(name, "not run")
        print(f"| `{name}` | {a} | {b} |")
        if a == "passed" and b != "passed":
            lost.append(name)
    print(f"\npass without speculation: {sum(v == 'passed' for v in plain.values())}; pass with DFLASH: "
          f"{sum(v == 'passed' for v in dflash.values())}; pass without but not with DFLASH: {len(lost)} {lost or ''}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
