"""Emulated devices. A device sees its registers, guest memory and its interrupt; never KVM."""
