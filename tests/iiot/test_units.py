"""Units: aliases, quantities, and conversions against known values."""

from __future__ import annotations

import numpy as np
import pytest

from services.iiot.units import (
    QUANTITIES,
    UNITS,
    IncompatibleUnits,
    UnknownUnit,
    canonical_unit,
    convert,
    converter,
    is_known_unit,
    quantity_of,
    units_of,
)


@pytest.mark.parametrize(("alias", "name"), [
    ("°C", "degC"), ("degC", "degC"), ("C", "degC"), ("celsius", "degC"), ("Celsius", "degC"), ("℃", "degC"),
    (" deg C ", "degC"), ("°F", "degF"), ("fahrenheit", "degF"), ("kelvin", "K"),
    ("PSI", "psi"), ("Bar", "bar"), ("kpa", "kPa"), ("MPA", "MPa"), ("m³/h", "m3/h"), ("m^3/h", "m3/h"),
    ("m/s²", "m/s2"), ("l/min", "L/min"), ("RPM", "rpm"), ("hz", "Hz"), ("percent", "%"), ("IPS", "in/s"),
])
def test_aliases_name_one_canonical_unit(alias: str, name: str) -> None:
    assert canonical_unit(alias) == name
    assert is_known_unit(alias)


@pytest.mark.parametrize("unknown", ["furlong", "", "mpa", "MA", "mW", "degX"])
def test_unknown_and_ambiguous_names_are_refused_with_the_name(unknown: str) -> None:
    with pytest.raises(UnknownUnit, match="unknown unit") as caught:
        canonical_unit(unknown)
    assert caught.value.unit == unknown
    assert not is_known_unit(unknown)
    assert quantity_of(unknown) is None


def test_every_unit_has_a_quantity_and_its_canonical_name_maps_to_itself() -> None:
    for name, unit in UNITS.items():
        assert canonical_unit(name) == name
        assert unit.quantity in QUANTITIES
        assert name in units_of(unit.quantity)
    assert quantity_of("psi") == "pressure"
    assert quantity_of("°F") == "temperature"
    assert quantity_of("g") == "acceleration"
    assert quantity_of("mm/s") == "vibration"
    assert units_of("nothing") == ()


@pytest.mark.parametrize(("value", "source", "target", "expected"), [
    (100.0, "degC", "degF", 212.0), (32.0, "degF", "degC", 0.0), (-40.0, "degF", "degC", -40.0),
    (0.0, "degC", "K", 273.15), (98.6, "°F", "K", 310.15),
    (1.0, "bar", "psi", 14.503773773), (1.0, "bar", "kPa", 100.0), (1.0, "MPa", "bar", 10.0),
    (14.5037738, "psi", "Pa", 100000.0), (1013.25, "mbar", "bar", 1.01325),
    (25.4, "mm/s", "in/s", 1.0), (1.0, "g", "m/s2", 9.80665),
    (250.0, "mA", "A", 0.25), (11.0, "kV", "V", 11000.0), (7.5, "kW", "W", 7500.0), (1.0, "hp", "kW", 0.7457),
    (1800.0, "rpm", "Hz", 30.0), (60.0, "m3/h", "L/min", 1000.0), (1.0, "gpm", "L/min", 3.785411784),
    (45.0, "%", "ratio", 0.45),
])
def test_conversions_match_known_values(value: float, source: str, target: str, expected: float) -> None:
    assert convert(value, source, target) == pytest.approx(expected, rel=1e-6)
    assert convert(expected, target, source) == pytest.approx(value, rel=1e-6)


def test_converter_is_vectorised_and_keeps_shape() -> None:
    values = np.array([[0.0, 100.0], [-40.0, 37.0]])
    result = converter("degC", "degF")(values)
    assert result.shape == (2, 2) and result.dtype == np.float64
    np.testing.assert_allclose(result, [[32.0, 212.0], [-40.0, 98.6]])
    assert converter("psi", "bar")([1.0, 2.0, float("nan")]).shape == (3,)
    assert np.isnan(converter("psi", "bar")([float("nan")])[0])


def test_same_unit_returns_values_unchanged() -> None:
    values = np.array([0.1, 0.2, 0.3])
    assert np.array_equal(converter("°C", "degC")(values), values)
    assert np.array_equal(converter("psi", "PSI")([1, 2]), np.array([1.0, 2.0]))


def test_incompatible_units_are_refused_when_asked_with_both_quantities() -> None:
    with pytest.raises(IncompatibleUnits, match=r"'psi' \(pressure\) to 'degC' \(temperature\)") as caught:
        converter("psi", "degC")
    assert (caught.value.from_quantity, caught.value.to_quantity) == ("pressure", "temperature")
    with pytest.raises(IncompatibleUnits):
        converter("mm/s", "g")  # velocity and acceleration need the vibration's frequency
    with pytest.raises(UnknownUnit):
        converter("psi", "furlong")
    assert issubclass(UnknownUnit, ValueError) and issubclass(IncompatibleUnits, ValueError)
