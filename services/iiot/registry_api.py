"""Asset registry endpoints of the IIoT vertical: plants, lines, assets, sensors (issue 19).

Plants, lines and assets are addressed by the tenant's own ids, flat (``/plants/{plant_id}``,
``/lines/{line_id}``, ``/assets/{asset_id}``: unique per tenant, as in the readings an
integrator sends); a child names its parent in its body (``plant_id``, ``line_id``). Sensors are
unique per asset, so they live under it: ``/assets/{asset_id}/sensors/{sensor_id}``.

Each level has ``POST`` (201 + Location; 409 when the id exists), a keyset-paged list (a full
page has a ``Link: <…>; rel="next"`` header), ``GET``, ``PUT`` (create or replace: 201 or 200,
idempotent), ``PATCH`` (the fields sent) and ``DELETE`` (204; everything under it goes too).
``PUT /registry`` upserts a whole tree in one request and ``GET /registry`` returns it.
Another tenant's id answers 404 like an unknown one.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from sqlalchemy.orm import Session

from services.iiot import registry
from services.iiot.registry import (
    ID_PATTERN,
    REGISTRY_EXAMPLE,
    REGISTRY_FLAT_EXAMPLE,
    AssetIn,
    AssetOut,
    AssetPatch,
    LineIn,
    LineOut,
    LinePatch,
    PlantIn,
    PlantOut,
    PlantPatch,
    RegistryBatch,
    RegistryDocument,
    SensorIn,
    SensorOut,
    SensorPatch,
    UpsertResult,
)
from shared.db import SessionDep
from shared.errors import problem_responses
from shared.security import Principal, require_scope

IiotPrincipal = Annotated[Principal, Depends(require_scope("iiot"))]
PlantId = Annotated[str, Path(pattern=ID_PATTERN, description="the tenant's id of the plant")]
LineId = Annotated[str, Path(pattern=ID_PATTERN, description="the tenant's id of the line")]
AssetId = Annotated[str, Path(pattern=ID_PATTERN, description="the tenant's id of the asset")]
SensorId = Annotated[str, Path(pattern=ID_PATTERN, description="the sensor's id on its asset")]
Limit = Annotated[int, Query(ge=1, le=1000, description="the most items on a page")]
After = Annotated[str | None, Query(pattern=ID_PATTERN, description=(
    "the last id of the previous page (take the next page's URL from the `Link` header)"))]
FilterId = Annotated[str | None, Query(pattern=ID_PATTERN)]

router = APIRouter(prefix="/v1", tags=["registry"], responses=problem_responses(401, 403))

Responses = dict[int | str, dict[str, Any]]
CREATED: Responses = {201: {"headers": {"Location": {"description": "the new node's URL",
                                                     "schema": {"type": "string"}}}}}
PAGED: Responses = {200: {"headers": {"Link": {"description": "<url of the next page>; rel=\"next\", on a full page",
                                              "schema": {"type": "string"}}}}}
WRITE = problem_responses(409, 415, 422, notes={
    409: "The id exists (POST), or a sensor's unit would change while it has readings.",
    422: "Also an unknown unit or time zone, min_value >= max_value, or a parent id this tenant does not have."})
NO_SUCH = problem_responses(404, notes={404: "No such id for this tenant (another tenant's ids answer the same)."})
PUT_ANSWERS: Responses = {200: {"description": "replaced"}, 201: {"description": "created"}, **NO_SUCH, **WRITE}


def _created(request: Request, response: Response, node_id: str) -> None:
    # From the request's own URL: behind the gateway (shared.app.PrefixDispatcher) url_for would drop "/iiot"
    response.headers["Location"] = str(request.url.replace(path=f"{request.url.path.rstrip('/')}/{node_id}", query=""))


def _paged(items: list[Any], key: str, limit: int, request: Request, response: Response) -> list[Any]:
    if len(items) == limit:
        next_url = request.url.include_query_params(after=getattr(items[-1], key))
        response.headers["Link"] = f'<{next_url}>; rel="next"'
    return items


def _put(session: Session, tenant_id: str, batch: RegistryBatch, response: Response) -> None:
    result = registry.upsert(session, tenant_id, batch)
    session.commit()
    created = sum(level.created for level in (result.plants, result.lines, result.assets, result.sensors))
    response.status_code = 201 if created else 200


# --- the whole registry ---------------------------------------------------------------------------------

@router.put("/registry", summary="Upsert a registry document", response_model=UpsertResult, responses=WRITE)
def put_registry(document: Annotated[RegistryDocument, Body(openapi_examples={
                     "nested": {"value": REGISTRY_EXAMPLE}, "flat": {"value": REGISTRY_FLAT_EXAMPLE}})],
                 principal: IiotPrincipal, session: SessionDep) -> UpsertResult:
    """Create or replace plants, lines, assets and sensors given as one document (nested under
    ``plants``, flat in ``plants``/``lines``/``assets``/``sensors``, or both) in one transaction:
    nodes that exist get the fields sent, new ones are created, nodes not mentioned stay (it never
    deletes). Sending the same document again changes nothing (all counted ``unchanged``)."""
    result = registry.upsert(session, principal.tenant_id, registry.flatten(document))
    session.commit()
    return result


@router.get("/registry", summary="The whole registry", response_model=RegistryDocument,
            response_model_exclude_unset=True)
def get_registry(principal: IiotPrincipal, session: SessionDep) -> RegistryDocument:
    """The tenant's whole registry as one flat document (what ``PUT /registry`` takes back, and
    ``tessera edge --registry`` reads)."""
    return registry.registry_document(session, principal.tenant_id)


# --- plants ----------------------------------------------------------------------------------------

@router.post("/plants", status_code=201, summary="Add a plant", response_model=PlantOut,
             responses={**CREATED, **WRITE})
def create_plant(plant: PlantIn, request: Request, response: Response, principal: IiotPrincipal,
                 session: SessionDep) -> PlantOut:
    """Add a plant (its ``timezone`` reads timestamps sent without an offset; UTC by default)."""
    registry.create(session, principal.tenant_id, registry.single("plant", plant), "plant", plant.plant_id)
    session.commit()
    _created(request, response, plant.plant_id)
    return registry.get_plant(session, principal.tenant_id, plant.plant_id)


@router.get("/plants", summary="List plants", response_model=list[PlantOut], responses=PAGED)
def list_plants(request: Request, response: Response, principal: IiotPrincipal, session: SessionDep,
                after: After = None, limit: Limit = 100) -> list[PlantOut]:
    """The tenant's plants by id, a page at a time."""
    return _paged(registry.list_plants(session, principal.tenant_id, after=after, limit=limit),
                  "plant_id", limit, request, response)


@router.get("/plants/{plant_id}", summary="A plant", response_model=PlantOut, responses=NO_SUCH)
def get_plant(plant_id: PlantId, principal: IiotPrincipal, session: SessionDep) -> PlantOut:
    """One of the tenant's plants."""
    return registry.get_plant(session, principal.tenant_id, plant_id)


@router.put("/plants/{plant_id}", summary="Create or replace a plant", response_model=PlantOut,
            responses=PUT_ANSWERS)
def put_plant(plant_id: PlantId, plant: PlantIn, response: Response, principal: IiotPrincipal,
              session: SessionDep) -> PlantOut:
    """Create the plant, or replace its fields (absent ones return to their defaults)."""
    registry.body_id_matches(plant_id, plant.plant_id, "plant_id")
    _put(session, principal.tenant_id, registry.single("plant", plant), response)
    return registry.get_plant(session, principal.tenant_id, plant_id)


@router.patch("/plants/{plant_id}", summary="Change a plant", response_model=PlantOut,
              responses={**NO_SUCH, **WRITE})
def patch_plant(plant_id: PlantId, patch: PlantPatch, principal: IiotPrincipal, session: SessionDep) -> PlantOut:
    """Change the fields sent (name, timezone)."""
    out = registry.patch_plant(session, principal.tenant_id, plant_id, patch)
    session.commit()
    return out


@router.delete("/plants/{plant_id}", status_code=204, summary="Delete a plant", response_class=Response,
               responses=NO_SUCH)
def delete_plant(plant_id: PlantId, principal: IiotPrincipal, session: SessionDep) -> Response:
    """Delete a plant and everything under it: lines, assets, sensors, readings, scores, alerts."""
    registry.delete_plant(session, principal.tenant_id, plant_id)
    session.commit()
    return Response(status_code=204)


# --- lines -----------------------------------------------------------------------------------------

@router.post("/lines", status_code=201, summary="Add a line", response_model=LineOut, responses={**CREATED, **WRITE})
def create_line(line: LineIn, request: Request, response: Response, principal: IiotPrincipal,
                session: SessionDep) -> LineOut:
    """Add a line to one of the tenant's plants (``plant_id``)."""
    registry.create(session, principal.tenant_id, registry.single("line", line), "line", line.line_id)
    session.commit()
    _created(request, response, line.line_id)
    return registry.get_line(session, principal.tenant_id, line.line_id)


@router.get("/lines", summary="List lines", response_model=list[LineOut], responses=PAGED)
def list_lines(request: Request, response: Response, principal: IiotPrincipal, session: SessionDep,
               plant_id: FilterId = None, after: After = None, limit: Limit = 100) -> list[LineOut]:
    """The tenant's lines by id (of one plant when ``plant_id`` is given), a page at a time."""
    return _paged(registry.list_lines(session, principal.tenant_id, plant_id=plant_id, after=after, limit=limit),
                  "line_id", limit, request, response)


@router.get("/lines/{line_id}", summary="A line", response_model=LineOut, responses=NO_SUCH)
def get_line(line_id: LineId, principal: IiotPrincipal, session: SessionDep) -> LineOut:
    """One of the tenant's lines."""
    return registry.get_line(session, principal.tenant_id, line_id)


@router.put("/lines/{line_id}", summary="Create or replace a line", response_model=LineOut, responses=PUT_ANSWERS)
def put_line(line_id: LineId, line: LineIn, response: Response, principal: IiotPrincipal,
             session: SessionDep) -> LineOut:
    """Create the line, or replace its fields (another ``plant_id`` moves it)."""
    registry.body_id_matches(line_id, line.line_id, "line_id")
    _put(session, principal.tenant_id, registry.single("line", line), response)
    return registry.get_line(session, principal.tenant_id, line_id)


@router.patch("/lines/{line_id}", summary="Change a line", response_model=LineOut, responses={**NO_SUCH, **WRITE})
def patch_line(line_id: LineId, patch: LinePatch, principal: IiotPrincipal, session: SessionDep) -> LineOut:
    """Change the fields sent (name; ``plant_id`` moves the line)."""
    out = registry.patch_line(session, principal.tenant_id, line_id, patch)
    session.commit()
    return out


@router.delete("/lines/{line_id}", status_code=204, summary="Delete a line", response_class=Response,
               responses=NO_SUCH)
def delete_line(line_id: LineId, principal: IiotPrincipal, session: SessionDep) -> Response:
    """Delete a line and everything under it."""
    registry.delete_line(session, principal.tenant_id, line_id)
    session.commit()
    return Response(status_code=204)


# --- assets ----------------------------------------------------------------------------------------

@router.post("/assets", status_code=201, summary="Add an asset", response_model=AssetOut,
             responses={**CREATED, **WRITE})
def create_asset(asset: AssetIn, request: Request, response: Response, principal: IiotPrincipal,
                 session: SessionDep) -> AssetOut:
    """Add an asset to one of the tenant's lines (``line_id``)."""
    registry.create(session, principal.tenant_id, registry.single("asset", asset), "asset", asset.asset_id)
    session.commit()
    _created(request, response, asset.asset_id)
    return registry.get_asset(session, principal.tenant_id, asset.asset_id)


@router.get("/assets", summary="List assets", response_model=list[AssetOut], responses=PAGED)
def list_assets(request: Request, response: Response, principal: IiotPrincipal, session: SessionDep,
                plant_id: FilterId = None, line_id: FilterId = None, after: After = None,
                limit: Limit = 100) -> list[AssetOut]:
    """The tenant's assets by id (of one plant or line when given), a page at a time."""
    items = registry.list_assets(session, principal.tenant_id, plant_id=plant_id, line_id=line_id, after=after,
                                 limit=limit)
    return _paged(items, "asset_id", limit, request, response)


@router.get("/assets/{asset_id}", summary="An asset", response_model=AssetOut, responses=NO_SUCH)
def get_asset(asset_id: AssetId, principal: IiotPrincipal, session: SessionDep) -> AssetOut:
    """One of the tenant's assets."""
    return registry.get_asset(session, principal.tenant_id, asset_id)


@router.put("/assets/{asset_id}", summary="Create or replace an asset", response_model=AssetOut,
            responses=PUT_ANSWERS)
def put_asset(asset_id: AssetId, asset: AssetIn, response: Response, principal: IiotPrincipal,
              session: SessionDep) -> AssetOut:
    """Create the asset, or replace its fields (another ``line_id`` moves it); its sensors stay."""
    registry.body_id_matches(asset_id, asset.asset_id, "asset_id")
    _put(session, principal.tenant_id, registry.single("asset", asset), response)
    return registry.get_asset(session, principal.tenant_id, asset_id)


@router.patch("/assets/{asset_id}", summary="Change an asset", response_model=AssetOut,
              responses={**NO_SUCH, **WRITE})
def patch_asset(asset_id: AssetId, patch: AssetPatch, principal: IiotPrincipal, session: SessionDep) -> AssetOut:
    """Change the fields sent (``line_id`` moves the asset; ``details`` is replaced as a whole)."""
    out = registry.patch_asset(session, principal.tenant_id, asset_id, patch)
    session.commit()
    return out


@router.delete("/assets/{asset_id}", status_code=204, summary="Delete an asset", response_class=Response,
               responses=NO_SUCH)
def delete_asset(asset_id: AssetId, principal: IiotPrincipal, session: SessionDep) -> Response:
    """Delete an asset with its sensors, readings, risk scores, alerts and maintenance records."""
    registry.delete_asset(session, principal.tenant_id, asset_id)
    session.commit()
    return Response(status_code=204)


# --- sensors ---------------------------------------------------------------------------------------

@router.post("/assets/{asset_id}/sensors", status_code=201, summary="Add a sensor", response_model=SensorOut,
             responses={**CREATED, **NO_SUCH, **WRITE})
def create_sensor(asset_id: AssetId, sensor: SensorIn, request: Request, response: Response,
                  principal: IiotPrincipal, session: SessionDep) -> SensorOut:
    """Add a sensor to an asset: its canonical unit (required), quantity (derived from the unit when
    absent), expected range and sampling interval."""
    registry.create(session, principal.tenant_id, registry.single("sensor", sensor, asset_id), "sensor",
                    sensor.sensor_id)
    session.commit()
    _created(request, response, sensor.sensor_id)
    return registry.get_sensor(session, principal.tenant_id, asset_id, sensor.sensor_id)


@router.get("/assets/{asset_id}/sensors", summary="List an asset's sensors", response_model=list[SensorOut],
            responses={**PAGED, **NO_SUCH})
def list_sensors(asset_id: AssetId, request: Request, response: Response, principal: IiotPrincipal,
                 session: SessionDep, after: After = None, limit: Limit = 100) -> list[SensorOut]:
    """The asset's sensors by id, a page at a time."""
    return _paged(registry.list_sensors(session, principal.tenant_id, asset_id, after=after, limit=limit),
                  "sensor_id", limit, request, response)


@router.get("/assets/{asset_id}/sensors/{sensor_id}", summary="A sensor", response_model=SensorOut,
            responses=NO_SUCH)
def get_sensor(asset_id: AssetId, sensor_id: SensorId, principal: IiotPrincipal, session: SessionDep) -> SensorOut:
    """One sensor of one of the tenant's assets, with its watermark and reading count."""
    return registry.get_sensor(session, principal.tenant_id, asset_id, sensor_id)


@router.put("/assets/{asset_id}/sensors/{sensor_id}", summary="Create or replace a sensor",
            response_model=SensorOut, responses=PUT_ANSWERS)
def put_sensor(asset_id: AssetId, sensor_id: SensorId, sensor: SensorIn, response: Response,
               principal: IiotPrincipal, session: SessionDep) -> SensorOut:
    """Create the sensor, or replace its fields (its unit only while it has no readings: 409)."""
    registry.body_id_matches(sensor_id, sensor.sensor_id, "sensor_id")
    registry.get_asset(session, principal.tenant_id, asset_id)  # 404 before anything else
    _put(session, principal.tenant_id, registry.single("sensor", sensor, asset_id), response)
    return registry.get_sensor(session, principal.tenant_id, asset_id, sensor_id)


@router.patch("/assets/{asset_id}/sensors/{sensor_id}", summary="Change a sensor", response_model=SensorOut,
              responses={**NO_SUCH, **WRITE})
def patch_sensor(asset_id: AssetId, sensor_id: SensorId, patch: SensorPatch, principal: IiotPrincipal,
                 session: SessionDep) -> SensorOut:
    """Change the fields sent (``null`` clears the range or interval); a new unit derives the
    quantity again unless one is sent."""
    out = registry.patch_sensor(session, principal.tenant_id, asset_id, sensor_id, patch)
    session.commit()
    return out


@router.delete("/assets/{asset_id}/sensors/{sensor_id}", status_code=204, summary="Delete a sensor",
               response_class=Response, responses=NO_SUCH)
def delete_sensor(asset_id: AssetId, sensor_id: SensorId, principal: IiotPrincipal, session: SessionDep) -> Response:
    """Delete a sensor and its readings."""
    registry.delete_sensor(session, principal.tenant_id, asset_id, sensor_id)
    session.commit()
    return Response(status_code=204)
