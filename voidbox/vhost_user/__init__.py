"""vhost-user: voidbox's device cores served to a vhost-user frontend (QEMU and others).

protocol.py is the sans-I/O message codec (QEMU's docs/interop/vhost-user.rst).
"""
