"""benchmarks/sass_liveness.py on a small SASS listing whose liveness is worked out by hand."""

import csv

from benchmarks import sass_liveness

LISTING = [  # (instruction, times executed): a loop of 4 between two instructions run once
    ("MOV R1, 0x1", 1),
    ("LDS.128 R4, [R2+0x10]", 10),  # writes R4-R7
    ("HMMA.16816.F32 R8, R4, R12, R8", 10),  # D R8-R11, A R4-R7, B R12-R13, C R8-R11
    ("@P0 FADD R20, R8, R1", 10),
    ("STS [R2], R20", 10),
    ("EXIT", 1),
]


def test_liveness_of_a_hand_worked_loop(tmp_path):
    path = tmp_path / "kernel_sass.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Kernel Name", "k"])
        writer.writerow(["Address", "Source", "Instructions Executed"])
        writer.writerows([hex(16 * i), text, count] for i, (text, count) in enumerate(LISTING))
    loop, ops, live = sass_liveness.liveness(sass_liveness.read_sass(path))
    assert loop == [text for text, count in LISTING if count == 10]
    # R1, R2, R12, R13 invariant; R8-R11 carried; R4-R7 only between the load and the MMA
    assert live[0] == {1, 2, 8, 9, 10, 11, 12, 13}
    assert live[1] == {1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13}
    assert live[3] == {1, 2, 8, 9, 10, 11, 12, 13, 20}
    assert sass_liveness.holders(ops, live, 1) == {
        "before the loop": 4, "LDS.128": 4, "HMMA.16816.F32 (last step)": 4}
    assert ops[3] == ("STS", set(), {2, 20})


def test_profile_summary_shares_of_stalls_and_opcodes(tmp_path):
    """benchmarks/profile_summary.py: stall reasons and opcodes as shares, worked by hand
    (a predicated instruction counts under its opcode; the not-issued columns are left out)."""
    from benchmarks import profile_summary
    path = tmp_path / "kernel_sass.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Kernel Name", "k"])
        writer.writerow(["Address", "Source", "Instructions Executed", "stall_wait",
                         "stall_math", "stall_wait (Not Issued)"])
        writer.writerows([["0x0", "LOP3.LUT R1, R2, 0x3, RZ, 0xc0, !PT", "1000", 3, 1, 9],
                          ["0x10", "@P0 LOP3.LUT R3, R2, 0x3, RZ, 0xc0, !PT", "500", 0, 2, 9],
                          ["0x20", "HMMA.16816.F32 R8, R4, R12, R8", "500", 2, 0, 9]])
    stalls, mix = profile_summary.sass_counts(path)
    assert stalls == {"wait": 0.625, "math": 0.375}
    assert mix == {"LOP3": 0.75, "HMMA": 0.25}
