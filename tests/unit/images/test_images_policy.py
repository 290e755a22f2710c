import pytest

from edge.images.errors import ImageNeverPullError
from edge.images.policy import PullPolicy, pull_policy, should_pull

DIGEST = "sha256:" + "0" * 64


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("busybox", PullPolicy.ALWAYS),
        ("busybox:latest", PullPolicy.ALWAYS),
        ("registry.example.com:5000/app", PullPolicy.ALWAYS),
        ("busybox:1.36", PullPolicy.IF_NOT_PRESENT),
        (f"busybox@{DIGEST}", PullPolicy.IF_NOT_PRESENT),
        (f"busybox:latest@{DIGEST}", PullPolicy.ALWAYS),
    ],
)
def test_default_policy(image: str, expected: PullPolicy) -> None:
    assert pull_policy(image) == expected
    assert pull_policy(image, "") == expected


def test_declared_policy_wins() -> None:
    assert pull_policy("busybox", "Never") is PullPolicy.NEVER
    assert pull_policy("busybox:1", "Always") is PullPolicy.ALWAYS
    with pytest.raises(ValueError, match="'always' is not one of Always, IfNotPresent, Never"):
        pull_policy("busybox", "always")


@pytest.mark.parametrize(
    ("policy", "present", "pull"),
    [
        (PullPolicy.ALWAYS, True, True),
        (PullPolicy.ALWAYS, False, True),
        (PullPolicy.IF_NOT_PRESENT, True, False),
        (PullPolicy.IF_NOT_PRESENT, False, True),
        (PullPolicy.NEVER, True, False),
    ],
)
def test_should_pull(policy: PullPolicy, present: bool, pull: bool) -> None:
    assert should_pull(policy, present, "app:1") is pull


def test_never_with_the_image_missing_is_err_image_never_pull() -> None:
    with pytest.raises(ImageNeverPullError, match="app:1 is not on this node"):
        should_pull(PullPolicy.NEVER, False, "app:1")
