"""voidbox._lazylog: loggers that import logging only when a record could be emitted."""

import logging
import subprocess
import sys

from voidbox._lazylog import DEBUG, INFO, WARNING, get_logger


def test_levels_are_loggings():
    assert (DEBUG, INFO, WARNING) == (logging.DEBUG, logging.INFO, logging.WARNING)


def test_records_reach_logging_under_the_modules_name(caplog):
    log = get_logger("voidbox.test.lazy")
    with caplog.at_level(logging.DEBUG, logger="voidbox.test.lazy"):
        log.debug("d %d", 1)
        log.info("i %s", "x")
        log.log(WARNING, "w")
        log.warning("w2")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("e")
    got = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert got == [("voidbox.test.lazy", logging.DEBUG, "d 1"),
                   ("voidbox.test.lazy", logging.INFO, "i x"),
                   ("voidbox.test.lazy", logging.WARNING, "w"),
                   ("voidbox.test.lazy", logging.WARNING, "w2"),
                   ("voidbox.test.lazy", logging.ERROR, "e")]
    assert caplog.records[-1].exc_info[0] is ValueError


def test_below_warning_nothing_imports_logging_until_something_has():
    code = ("import sys\n"
            "from voidbox._lazylog import get_logger, INFO\n"
            "import voidbox.eventloop, voidbox.net.engine, voidbox.net.tcp_nat, voidbox.net.limits\n"
            "log = get_logger('x')\n"
            "log.info('dropped'); log.debug('dropped'); log.log(INFO, 'dropped')\n"
            "print('logging' in sys.modules)\n"
            "log.warning('shown')\n"
            "print('logging' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
    assert out.stderr == "shown\n"  # logging's last-resort handler: WARNING and up
