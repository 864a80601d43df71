"""What the lifespan yields to request handlers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

if TYPE_CHECKING:
    from fleet_controller.hub import Hub
    from fleet_controller.link import Link
    from fleet_controller.service import Dispatcher
    from fleet_controller.settings import ControllerSettings
    from fleet_controller.store import Store
    from fleet_controller.tokens import TokenStore


@dataclass(frozen=True, slots=True)
class Services:
    settings: ControllerSettings
    store: Store
    link: Link
    hub: Hub
    dispatcher: Dispatcher
    tokens: TokenStore


def get_services(request: Request) -> Services:
    services: Services = request.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
