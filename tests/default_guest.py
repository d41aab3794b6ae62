"""The default guest for tests that boot a real kernel.

Off CI a missing guest skips with the reason; under CI, where scripts/bootstrap builds it,
a missing guest is a failure (tests/requires.py).
"""

from tests.requires import missing


def require_default_guest(build: bool = False):
    from voidbox.errors import VoidboxError
    from voidbox.image import build_default_guest, cache_dir, default_guest

    guest = default_guest()
    reason = f"the default guest is not built (run `voidbox image build`; cache {cache_dir()})"
    if guest is None and build:
        try:
            guest = build_default_guest(progress=lambda message: None)
        except VoidboxError as error:
            reason = f"the default guest is not built and cannot be built here: {error}"
    if guest is None:
        missing(reason)
    return guest
