"""What holds a kernel's registers: live registers through the hottest loop of its SASS, from
the source page Nsight Compute exports (`bash benchmarks/profile.sh` writes <policy>_sass.csv).

The loop is the run of instructions executed most often; liveness is solved over it as a cycle
(what is live at its end is live at its start). The registers live where most are, are
grouped by the opcode that last wrote them: "before the loop" are loop invariants,
"(last step)" values carried from the previous step. Approximate: operand widths come from
the opcode (HMMA's 4-2-4, LDS.128's 4, .64 pairs), predicates and uniform registers are not
counted, and the branches inside the loop count as straight-line code.

    python -m benchmarks.sass_liveness profile/kivi2_mma_sass.csv
"""

import argparse
import collections
import csv
import re

REGISTER = re.compile(r"(?<![\w.])R(\d+)(\.64)?")
NO_DESTINATION = ("ST", "LDGSTS", "BRA", "BSYNC", "BSSY", "WARPSYNC", "DEPBAR", "LDGDEPBAR",
                  "NOP", "VOTE", "EXIT", "BAR", "RED", "ATOM")


def read_sass(path):
    """[(instruction text, times executed)] in address order."""
    with open(path) as f:
        rows = list(csv.reader(f))
    header = rows[1]
    text, count = header.index("Source"), header.index("Instructions Executed")
    return [(row[text].strip(), int(row[count] or 0)) for row in rows[2:]]


def opcode(instruction):
    """The opcode of a SASS instruction, without its predicate and modifiers (HMMA, LDS)."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def _width(opcode, position):
    """Registers an operand names from its first: HMMA's D, A, B, C; vector loads and stores."""
    if opcode.startswith("HMMA"):
        return (4, 4, 2, 4)[position]
    vector = 4 if ".128" in opcode else 2 if ".64" in opcode else 1
    if opcode.startswith("LD") and position == 0 or opcode.startswith("ST") and position == 1:
        return vector
    return 2 if opcode.startswith("IMAD.WIDE") and position in (0, 3) else 1


def operands(instruction):
    """(opcode, registers written, registers read) of one SASS instruction; an address
    ([R], [R.64]) is read."""
    instruction = re.sub(r"^@!?U?P\w+\s+", "", instruction)
    opcode, _, rest = instruction.partition(" ")
    fields = [f.strip() for f in re.split(r",(?![^\[]*\])", rest.strip().rstrip(";")) if f]
    written, read = set(), set()
    for position, field in enumerate(fields):
        for number, pair in REGISTER.findall(field):
            width = 2 if pair else 1 if "[" in field else _width(opcode, position)
            registers = {int(number) + k for k in range(width)}
            is_destination = (position == 0 and "[" not in field
                              and not opcode.startswith(NO_DESTINATION))
            (written if is_destination else read).update(registers)
    return opcode, written, read


def liveness(sass):
    """The hottest loop's instructions and, for each, the registers live into it."""
    hottest = max(count for _, count in sass)
    rows = [i for i, (_, count) in enumerate(sass) if count == hottest]
    loop = [sass[i][0] for i in range(rows[0], rows[-1] + 1)]
    ops = [operands(x) for x in loop]
    live = [set() for _ in ops]
    changed = True
    while changed:  # backwards to a fixed point, the loop's end feeding its start
        changed = False
        for i in reversed(range(len(ops))):
            _, written, read = ops[i]
            new = read | (live[(i + 1) % len(ops)] - written)
            if new != live[i]:
                live[i], changed = new, True
    return loop, ops, live


def holders(ops, live, at):
    """The registers live into instruction `at`, counted by the opcode that last wrote them."""
    counts = collections.Counter()
    for register in live[at]:
        writer = next((k for k in range(at - 1, at - 1 - len(ops), -1)
                       if register in ops[k % len(ops)][1]), None)
        if writer is None:
            counts["before the loop"] += 1
        else:
            counts[ops[writer % len(ops)][0] + (" (last step)" if writer < 0 else "")] += 1
    return counts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("sass_csv")
    args = parser.parse_args()
    loop, ops, live = liveness(read_sass(args.sass_csv))
    peak = max(range(len(live)), key=lambda i: len(live[i]))
    print(f"loop of {len(loop)} instructions; live registers: {len(live[0])} at its start, "
          f"{len(live[peak])} at most, before instruction {peak}: {loop[peak]}")
    for name, count in holders(ops, live, peak).most_common():
        print(f"{count:5d}  {name}")


if __name__ == "__main__":
    main()
