"""`dataclass`, `field` and `named_tuple` for the modules `voidbox boot` imports, without
the cost of dataclasses and typing.

Start-up is a feature (voidbox/launch.py). The boot path defines about 30 dataclasses, and
the standard decorator costs about a fifth of a trivial boot: importing dataclasses pulls
in inspect (with ast, dis and tokenize), and each class's methods are compiled one exec()
at a time, plus an inspect.signature() for every class without a docstring.

This decorator makes the same classes for the subset voidbox uses (frozen, slots, eq,
defaults, default_factory, __post_init__, inheritance), with one exec() per class (its
__init__, compiled when the first instance is made) and nothing imported. The classes
stay dataclasses to the outside: dataclasses.fields(), replace(), asdict() and
is_dataclass() work (replace() here does the same without importing dataclasses), because
`__dataclass_fields__` is built of real dataclasses.Field objects the first time anything
asks for it; assigning to a frozen instance raises dataclasses.FrozenInstanceError.

`named_tuple` is typing.NamedTuple's class syntax on collections.namedtuple: importing
typing costs ~3 ms (~6 ms with the re and contextlib it pulls in), and typing.NamedTuple
compiles every field's annotation, a string here, into a ForwardRef.
"""

from __future__ import annotations

from operator import attrgetter

_MISSING = object()
_FACTORY = type("_HasDefaultFactory", (), {"__repr__": lambda self: "<factory>"})()


class _Field:
    __slots__ = ("default", "default_factory")

    def __init__(self, default, default_factory):
        self.default = default
        self.default_factory = default_factory


def field(*, default=_MISSING, default_factory=_MISSING) -> _Field:
    """dataclasses.field with the two arguments voidbox uses."""
    if default is not _MISSING and default_factory is not _MISSING:
        raise ValueError("cannot specify both default and default_factory")
    return _Field(default, default_factory)


def replace(obj, /, **changes):
    """dataclasses.replace, without importing dataclasses for a class made here."""
    entries = type(obj).__dict__.get("__record_fields__")
    if entries is None:
        import dataclasses

        return dataclasses.replace(obj, **changes)
    for name in changes:
        if not any(entry[0] == name for entry in entries):
            raise TypeError(f"{type(obj).__qualname__}.__init__() got an unexpected keyword "
                            f"argument {name!r}")
    values = {entry[0]: getattr(obj, entry[0]) for entry in entries}
    values.update(changes)
    return type(obj)(**values)


class _LazyDataclassFields:
    """`cls.__dataclass_fields__` on first access: real dataclasses.Field objects."""

    def __get__(self, obj, owner):
        import dataclasses

        fields = {}
        for name, annotation, default, factory in owner.__record_fields__:
            f = dataclasses.field(
                default=dataclasses.MISSING if default is _MISSING else default,
                default_factory=dataclasses.MISSING if factory is _MISSING else factory)
            f.name, f.type, f._field_type = name, annotation, dataclasses._FIELD
            fields[name] = f
        type.__setattr__(owner, "__dataclass_fields__", fields)
        return fields


def _frozen_error(name, verb="assign to"):
    from dataclasses import FrozenInstanceError

    return FrozenInstanceError(f"cannot {verb} field {name!r}")


def dataclass(cls=None, /, *, frozen: bool = False, slots: bool = False, eq: bool = True,
              kw_only: bool = False):
    """@dataclass, @dataclass(frozen=..., slots=..., eq=..., kw_only=...): see the module
    docstring. kw_only makes every field of the class, its bases' too, keyword-only (so a
    field without a default may follow one with)."""
    def wrap(c):
        return _process(c, frozen, slots, eq, kw_only)

    return wrap if cls is None else wrap(cls)


def _values_getter(names: tuple[str, ...]):
    """self -> the tuple of its field values, in order."""
    if len(names) > 1:
        return attrgetter(*names)
    if names:
        get = attrgetter(names[0])
        return lambda self: (get(self),)
    return lambda self: ()


def _repr(self) -> str:
    values = self.__record_values__(self)
    inner = ", ".join(f"{entry[0]}={value!r}"
                      for entry, value in zip(self.__record_fields__, values, strict=True))
    return f"{self.__class__.__qualname__}({inner})"


def _eq(self, other):
    if other.__class__ is self.__class__:
        return self.__record_values__(self) == other.__record_values__(other)
    return NotImplemented


def _hash(self) -> int:
    return hash(self.__record_values__(self))


def _is_classvar(annotation) -> bool:
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return text.startswith(("ClassVar", "typing.ClassVar", "t.ClassVar"))


def _process(cls, frozen: bool, slots: bool, eq: bool, kw_only: bool = False):
    inherited = {}
    for base in reversed(cls.__mro__[1:]):
        for entry in base.__dict__.get("__record_fields__", ()):
            inherited[entry[0]] = entry
    own = []
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        if _is_classvar(annotation):
            continue
        value = cls.__dict__.get(name, _MISSING)
        if isinstance(value, _Field):
            default, factory = value.default, value.default_factory
        else:
            default, factory = value, _MISSING
        if default is not _MISSING and factory is _MISSING and (
                isinstance(default, list | dict | set)):
            raise ValueError(f"mutable default {type(default)} for field {name} is not allowed: "
                             "use default_factory")
        inherited.pop(name, None)
        own.append((name, annotation, default, factory))
    entries = (*inherited.values(), *own)
    names = [entry[0] for entry in entries]
    own_names = {entry[0] for entry in own}
    # dataclasses' rule: a __hash__ written in the class is kept; Python's own None (set
    # because the class body wrote __eq__) is not.
    explicit_hash = "__hash__" in cls.__dict__ and not (
        cls.__dict__["__hash__"] is None and "__eq__" in cls.__dict__)

    # Only __init__ is compiled (one exec: the call must be as fast as a hand-written one),
    # and only when the first instance is made: a boot makes few of the classes it
    # imports (most KVM exits and structures never happen), and the compiles were ~3 ms
    # of it. The other methods are closures and shared functions, which cost nothing.
    ns = {"_FACTORY": _FACTORY, "_setattr": object.__setattr__}
    params, body = [], []
    seen_default = False
    for name, _annotation, default, factory in entries:
        if factory is not _MISSING:
            ns[f"_factory_{name}"] = factory
            params.append(f"{name}=_FACTORY")
            value = f"_factory_{name}() if {name} is _FACTORY else {name}"
            seen_default = True
        elif default is not _MISSING:
            ns[f"_default_{name}"] = default
            params.append(f"{name}=_default_{name}")
            value = name
            seen_default = True
        else:
            if seen_default and not kw_only:
                raise TypeError(f"non-default argument {name!r} follows default argument")
            params.append(name)
            value = name
        body.append(f"  _setattr(self, {name!r}, {value})" if frozen else f"  self.{name} = {value}")
    if any("__post_init__" in c.__dict__ for c in cls.__mro__):
        body.append("  self.__post_init__()")
    if kw_only and params:
        params.insert(0, "*")
    source = "\n".join([f"def __init__(self, {', '.join(params)}):", *(body or ["  pass"])])

    def __init__(self, *args, **kwargs):
        exec(source, ns)  # noqa: S102  (two threads at once: both compile the same)
        init = ns["__init__"]
        init.__qualname__ = f"{final[0].__qualname__}.__init__"
        type.__setattr__(final[0], "__init__", init)
        init(self, *args, **kwargs)

    methods = {"__init__": __init__, "__repr__": _repr}
    values = _values_getter(tuple(names))
    if eq:
        methods["__eq__"] = _eq
    final = []  # the class, once made (slots make a new one)
    field_names = frozenset(names)
    if frozen:
        def __setattr__(self, name, value):
            if type(self) is final[0] or name in field_names:
                raise _frozen_error(name)
            super(final[0], self).__setattr__(name, value)

        def __delattr__(self, name):
            if type(self) is final[0] or name in field_names:
                raise _frozen_error(name, "delete")
            super(final[0], self).__delattr__(name)

        methods["__setattr__"], methods["__delattr__"] = __setattr__, __delattr__
    if slots and frozen:
        # As dataclasses does: frozen slotted instances cannot be unpickled by setattr.
        def __getstate__(self):
            return list(values(self))

        def __setstate__(self, state):
            for name, value in zip(names, state, strict=True):
                object.__setattr__(self, name, value)

        methods["__getstate__"], methods["__setstate__"] = __getstate__, __setstate__

    if slots:
        cls_dict = {k: v for k, v in cls.__dict__.items()
                    if k not in own_names and k not in ("__dict__", "__weakref__")}
        base_slots = {s for c in cls.__mro__[1:] for s in c.__dict__.get("__slots__", ())}
        cls_dict["__slots__"] = tuple(n for n, *_ in own if n not in base_slots)
        qualname = cls.__qualname__
        cls = type(cls)(cls.__name__, cls.__bases__, cls_dict)
        cls.__qualname__ = qualname
    else:
        for name, _annotation, default, _factory in own:
            if isinstance(cls.__dict__.get(name), _Field):  # the class attribute is the default
                if default is _MISSING:
                    delattr(cls, name)
                else:
                    setattr(cls, name, default)
    final.append(cls)
    for name, fn in methods.items():
        if name not in cls.__dict__ or name in ("__setattr__", "__delattr__"):
            if fn not in (_repr, _eq):  # shared by every class: keep their own names
                fn.__qualname__ = f"{cls.__qualname__}.{name}"
            type.__setattr__(cls, name, fn)
    if eq and not explicit_hash:
        type.__setattr__(cls, "__hash__", _hash if frozen else None)
    cls.__record_values__ = staticmethod(values)
    cls.__record_fields__ = entries
    cls.__dataclass_fields__ = _LazyDataclassFields()
    if "__match_args__" not in cls.__dict__:
        cls.__match_args__ = tuple(names)
    if not cls.__doc__:
        cls.__doc__ = f"{cls.__name__}({', '.join(names)})"
    return cls



def named_tuple(cls):
    """@named_tuple over `class X: a: int; b: str = ""` (docstring, methods, properties):
    the collections.namedtuple class typing.NamedTuple would make, without typing."""
    from collections import namedtuple

    own = cls.__dict__
    names = list(own.get("__annotations__", {}))
    defaults = [own[name] for name in names if name in own]
    if any(name not in own for name in names[len(names) - len(defaults):]):
        raise TypeError(f"{cls.__name__}: a field without a default follows one with")
    made = namedtuple(cls.__name__, names, defaults=defaults, module=cls.__module__)
    for key, value in own.items():
        if key not in names and key not in ("__dict__", "__weakref__", "__module__"):
            setattr(made, key, value)
    made.__qualname__ = cls.__qualname__
    return made
