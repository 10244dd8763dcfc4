"""Two JUnit XML files (the kits without speculation, with DFLASH) -> a markdown table and the verdict:
exit 1 if any test that passes without speculation does not pass with DFLASH."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def outcomes(path: str) -> dict[str, str]:
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        out[case.get("name")] = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}.get(kind, "passed")
    return out


def main(plain_xml: str, dflash_xml: str) -> int:
    plain, dflash = outcomes(plain_xml), outcomes(dflash_xml)
    print("| kit test | no speculation | DFLASH |\n|---|---|---|")
    lost = []
    for name in sorted(set(plain) | set(dflash)):
        a, b = plain.get(name, "not run"), dflash.get(name, "not run")
        print(f"| `{name}` | {a} | {b} |")
        if a == "passed" and b != "passed":
            lost.append(name)
    both = sum(plain.get(n) == "passed" for n in plain)
    print(f"\npass without speculation: {both}; of those, fail with DFLASH: {len(lost)} {lost or ''}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
