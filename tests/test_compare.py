"""The quality gate of ``cdm run``: a student passes only when it beats the teacher's own few-step Euler in both
judges' FD and keeps the pixel panel within its band of the real split."""

from workflows.compare import quality_gate
from workflows.pixel_reference import pixel_reference


def _res(fd, fd2, nw_ratio, edge_ratio):
    ref = pixel_reference()
    return {
        "fd": {"mean": fd},
        "fd2": {"mean": fd2},
        "near_white": {"mean": nw_ratio * ref.near_white},
        "edge_energy": {"mean": edge_ratio * ref.edge_energy},
    }


def test_gate_passes_a_student_better_than_the_teacher_with_real_looking_pixels():
    ok, lines = quality_gate(_res(1.4, 1.5, 1.2, 0.9), _res(3.5, 3.0, 0.05, 0.7))
    assert ok and len(lines) == 4 and all(ln.startswith("pass") for ln in lines)


def test_gate_fails_on_either_judge_or_an_over_saturated_panel():
    teacher = _res(3.5, 3.0, 0.05, 0.7)
    for student, failing in [
        (_res(1.4, 3.1, 1.2, 0.9), "fd2"),
        (_res(3.6, 1.5, 1.2, 0.9), "fd "),
        (_res(1.4, 1.5, 2.5, 0.9), "near_white"),
        (_res(1.4, 1.5, 1.2, 1.4), "edge_energy"),
    ]:
        ok, lines = quality_gate(student, teacher)
        assert not ok
        assert [ln for ln in lines if ln.startswith("FAIL")][0].split("  ")[1].startswith(failing.strip())
