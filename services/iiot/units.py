"""Units of sensor readings: canonical names, their quantity, and vectorised conversion.

Every unit is an affine map to its quantity's base unit: ``base = value * scale + offset``
(temperature is the only quantity with an offset). A sensor stores readings in its canonical
unit; a reading that arrives in another unit of the same quantity is converted with
:func:`converter`, which works on whole numpy arrays (one multiply-add per batch, no loop).

Names are matched exactly first, then case-insensitively (except the ``m``/``M`` of a short
symbol: ``mW`` is not ``MW``), after normalising typography
(``°C`` and ``℃`` → ``degC``, ``m³/h`` and ``m^3/h`` → ``m3/h``, ``m/s²`` → ``m/s2``, spaces
dropped). Vibration velocity (``mm/s``, ``in/s``) and acceleration (``g``, ``m/s2``) are
different quantities: a velocity cannot be converted to an acceleration without the vibration's
frequency, so they are refused as incompatible rather than guessed.

``%`` and ``ratio`` are dimensionless (quantity ``ratio``): humidity, load, valve opening.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Converter = Callable[[npt.ArrayLike], npt.NDArray[np.float64]]


class UnitError(ValueError):
    """A unit that cannot be used: unknown, or not convertible to the one asked for."""


class UnknownUnit(UnitError):
    """A unit name no alias matches."""

    def __init__(self, unit: str) -> None:
        self.unit = unit
        super().__init__(f"unknown unit {unit!r}; known units: {', '.join(sorted(UNITS))}")


class IncompatibleUnits(UnitError):
    """Two known units of different quantities (e.g. psi and degC)."""

    def __init__(self, from_unit: str, to_unit: str) -> None:
        self.from_unit, self.to_unit = canonical_unit(from_unit), canonical_unit(to_unit)
        self.from_quantity, self.to_quantity = quantity_of(from_unit), quantity_of(to_unit)
        super().__init__(f"cannot convert {from_unit!r} ({self.from_quantity}) to {to_unit!r} "
                         f"({self.to_quantity}): different quantities")


@dataclass(frozen=True)
class Unit:
    """A canonical unit: ``base = value * scale + offset`` in its quantity's base unit."""

    name: str
    quantity: str
    scale: float
    offset: float = 0.0
    aliases: tuple[str, ...] = ()


_UNITS: tuple[Unit, ...] = (
    # temperature, base kelvin
    Unit("degC", "temperature", 1.0, 273.15, ("°C", "C", "celsius", "deg C", "degreeC", "degrees C", "Cel")),
    Unit("degF", "temperature", 5.0 / 9.0, 273.15 - 32.0 * 5.0 / 9.0,
         ("°F", "F", "fahrenheit", "deg F", "degreeF", "degrees F")),
    Unit("K", "temperature", 1.0, 0.0, ("kelvin",)),
    # pressure, base pascal
    Unit("Pa", "pressure", 1.0, 0.0, ("pascal",)),
    Unit("kPa", "pressure", 1e3, 0.0, ("kilopascal",)),
    Unit("MPa", "pressure", 1e6, 0.0, ("megapascal",)),
    Unit("bar", "pressure", 1e5, 0.0, ("bars",)),
    Unit("mbar", "pressure", 1e2, 0.0, ("millibar", "hPa")),
    Unit("psi", "pressure", 6894.757293168361, 0.0, ("lbf/in2", "psig")),
    # vibration velocity, base m/s
    Unit("mm/s", "vibration", 1e-3, 0.0, ("mm s-1", "mmps")),
    Unit("in/s", "vibration", 0.0254, 0.0, ("ips", "inch/s", "in s-1")),
    # acceleration, base m/s2
    Unit("m/s2", "acceleration", 1.0, 0.0, ("m s-2", "ms-2")),
    Unit("g", "acceleration", 9.80665, 0.0, ("gn", "g0")),
    # electric current, base ampere
    Unit("A", "current", 1.0, 0.0, ("amp", "amps", "ampere")),
    Unit("mA", "current", 1e-3, 0.0, ("milliamp", "milliampere")),
    # voltage, base volt
    Unit("V", "voltage", 1.0, 0.0, ("volt", "volts")),
    Unit("mV", "voltage", 1e-3, 0.0, ("millivolt",)),
    Unit("kV", "voltage", 1e3, 0.0, ("kilovolt",)),
    # power, base watt
    Unit("W", "power", 1.0, 0.0, ("watt", "watts")),
    Unit("kW", "power", 1e3, 0.0, ("kilowatt",)),
    Unit("MW", "power", 1e6, 0.0, ("megawatt",)),
    Unit("hp", "power", 745.6998715822702, 0.0, ("horsepower",)),
    # rotational speed, base hertz (revolutions per second)
    Unit("Hz", "speed", 1.0, 0.0, ("hertz", "rps", "1/s")),
    Unit("rpm", "speed", 1.0 / 60.0, 0.0, ("r/min", "rev/min", "1/min")),
    Unit("rad/s", "speed", 1.0 / (2.0 * math.pi), 0.0, ()),
    # volumetric flow, base m3/s
    Unit("m3/s", "flow", 1.0, 0.0, ()),
    Unit("m3/h", "flow", 1.0 / 3600.0, 0.0, ("cbm/h",)),
    Unit("L/min", "flow", 1e-3 / 60.0, 0.0, ("l/min", "lpm")),
    Unit("L/s", "flow", 1e-3, 0.0, ("l/s",)),
    Unit("gpm", "flow", 3.785411784e-3 / 60.0, 0.0, ("gal/min",)),
    # dimensionless, base fraction
    Unit("%", "ratio", 1e-2, 0.0, ("percent", "pct", "%RH", "RH%")),
    Unit("ratio", "ratio", 1.0, 0.0, ("fraction",)),
)

UNITS: dict[str, Unit] = {unit.name: unit for unit in _UNITS}
"""The canonical units by name."""
QUANTITIES: tuple[str, ...] = tuple(dict.fromkeys(unit.quantity for unit in _UNITS))
"""Every quantity a known unit measures (temperature, pressure, vibration, acceleration, ...)."""

_TYPOGRAPHY = str.maketrans({"°": "deg", "℃": "degC", "℉": "degF", "³": "3", "²": "2", "^": "",
                             "·": "", "µ": "u", " ": ""})


def _normalise(name: str) -> str:
    return unicodedata.normalize("NFKC", name.strip()).translate(_TYPOGRAPHY)


def _fold(key: str) -> str:
    """Case-folded, except the m/M of a short symbol: milli and mega differ by 10⁹ (mW, MW)."""
    if len(key) <= 4 and key[:1] in ("m", "M"):
        return key[0] + key[1:].casefold()
    return key.casefold()


def _alias_tables() -> tuple[dict[str, str], dict[str, str]]:
    exact: dict[str, str] = {}
    folded: dict[str, set[str]] = {}
    for unit in _UNITS:
        for alias in (unit.name, *unit.aliases):
            key = _normalise(alias)
            exact.setdefault(key, unit.name)
            folded.setdefault(_fold(key), set()).add(unit.name)
    # A case-folded name is accepted only when it names one unit (never guess between mV and MV).
    unique_folded = {key: next(iter(names)) for key, names in folded.items() if len(names) == 1}
    return exact, unique_folded


_EXACT, _FOLDED = _alias_tables()


def canonical_unit(unit: str) -> str:
    """The canonical name of ``unit`` (``"°C"``, ``"C"``, ``"celsius"`` → ``"degC"``).

    Raises :class:`UnknownUnit` when no alias matches.
    """
    key = _normalise(unit)
    name = _EXACT.get(key) or _FOLDED.get(_fold(key))
    if name is None:
        raise UnknownUnit(unit)
    return name


def is_known_unit(unit: str) -> bool:
    """Whether ``unit`` names a known unit (by any alias)."""
    try:
        canonical_unit(unit)
    except UnknownUnit:
        return False
    return True


def quantity_of(unit: str) -> str | None:
    """The quantity ``unit`` measures (``"psi"`` → ``"pressure"``), ``None`` for an unknown unit."""
    try:
        return UNITS[canonical_unit(unit)].quantity
    except UnknownUnit:
        return None


def units_of(quantity: str) -> tuple[str, ...]:
    """The canonical units of ``quantity``, in declaration order (empty for an unknown quantity)."""
    return tuple(unit.name for unit in _UNITS if unit.quantity == quantity)


def _affine(from_unit: str, to_unit: str) -> tuple[float, float] | None:
    """``(a, b)`` with ``to = from * a + b``; ``None`` when the units are the same."""
    source, target = UNITS[canonical_unit(from_unit)], UNITS[canonical_unit(to_unit)]
    if source.quantity != target.quantity:
        raise IncompatibleUnits(from_unit, to_unit)
    if source.name == target.name:
        return None
    return source.scale / target.scale, (source.offset - target.offset) / target.scale


def converter(from_unit: str, to_unit: str) -> Converter:
    """A function converting values (scalar or array) from ``from_unit`` to ``to_unit``.

    The result is a float64 array of the input's shape; converting to the same unit returns the
    values unchanged (bit for bit). Raises :class:`UnknownUnit` or :class:`IncompatibleUnits`
    when asked, not when called.
    """
    coefficients = _affine(from_unit, to_unit)
    if coefficients is None:
        return _as_float_array
    a, b = coefficients

    def convert(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
        result = _as_float_array(values) * a
        if b:
            result += b
        return result

    return convert


def convert(values: npt.ArrayLike, from_unit: str, to_unit: str) -> npt.NDArray[np.float64]:
    """``values`` converted from ``from_unit`` to ``to_unit`` (see :func:`converter`)."""
    return converter(from_unit, to_unit)(values)


def _as_float_array(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return np.asarray(values, dtype=np.float64)
