"""This station's link to the plant (docs/records.md, "Plant-wide records"): the record forwarder and the NG-image
uploader started after the records and stopped after them. Their modules (psycopg, boto3: the ``plant`` extra) are
imported only when ``central`` is configured, so a station without it needs neither."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from service.core.errors import CentralUnavailable
from service.settings import Settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from service.records.central.forwarder import Forwarder
    from service.records.central.images import ImageForwarder

__all__ = ["PlantLink", "check_central"]

logger = logging.getLogger(__name__)


def check_central(settings: Settings) -> None:
    """Before the service starts: forwarding configured means records on, the ``plant`` extra installed and the DSN
    readable. Nothing to check while ``central`` is off.

    Raises:
        ValueError: naming the setting or file and what to do (never the DSN).
    """
    if not settings.central.enabled:
        return
    if not settings.records.enabled:
        raise ValueError("central: forwarding needs records.enabled (the station's journal is what is forwarded)")
    try:
        import psycopg  # noqa: F401
    except ModuleNotFoundError:
        raise ValueError("central: needs the 'plant' extra (psycopg, alembic, boto3): pip install '.[plant]'") from None
    settings.central.resolved_dsn()


class PlantLink:
    """The forwarder and, when ``central.objects`` is set, the image uploader of one station."""

    def __init__(self, forwarder: Forwarder, images: ImageForwarder | None) -> None:
        self.forwarder = forwarder
        self.images = images

    @classmethod
    def open(cls, settings: Settings, registry: CollectorRegistry) -> PlantLink | None:
        """Build (not start) the link of ``settings``; None while ``central`` is off.

        Raises:
            ValueError: as :func:`check_central`.
        """
        check_central(settings)
        if not settings.central.enabled:
            return None
        from service.records.central.forwarder import Forwarder
        from service.records.central.images import ImageForwarder
        from service.records.central.objects import object_store_from
        from service.records.central.settings import CentralSettings, redact_dsn

        central = CentralSettings.for_station(settings)
        assert central is not None
        forwarder = Forwarder(central, settings.data_dir, registry)
        store = object_store_from(central)
        images = ImageForwarder(central, settings.data_dir, store, registry) if store is not None else None
        logger.info(
            "central: station %s (line %s) forwards its records to %s%s",
            central.station_id, central.line_id, redact_dsn(central.dsn.get_secret_value()),
            f", NG images to {central.objects.kind}" if central.objects is not None else "",
        )  # fmt: skip
        return cls(forwarder, images)

    def prunable_seq(self) -> int | None:
        """The highest journal seq the records retention may delete: what the central store acknowledged."""
        return self.forwarder.acknowledged_seq()

    def start(self) -> None:
        """Start forwarding. Both threads poll every ``central.poll_interval_s`` and ship up to a batch at a time
        (at once again after a full one) rather than being woken by each records commit: on a busy line one central
        transaction per interval instead of one per group commit, and a record reaches the plant within about one
        interval (docs/records.md, "Plant-wide records")."""
        self.forwarder.start()
        if self.images is not None:
            self.images.start()

    def query(self, filters: Any, limit: int, cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """Plant-wide records (:func:`service.records.central.query.query_records`), on a connection of this call's
        own (blocking: run it off the event loop).

        Raises:
            CentralUnavailable: the central store did not answer (the message has no DSN).
            ValueError: a cursor the plant query did not return.
        """
        import psycopg

        from service.records.central.query import query_records
        from service.records.central.settings import scrub

        settings = self.forwarder.settings
        dsn = settings.dsn.get_secret_value()
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=settings.connect_timeout_s) as conn:
                return query_records(conn, filters, limit, cursor)
        except psycopg.Error as exc:
            raise CentralUnavailable(f"the central store did not answer: {scrub(str(exc).strip(), dsn)}") from None

    def state(self) -> dict[str, Any]:
        """What ``GET /v1/station`` shows of the link (no secret in it)."""
        return {
            "forwarder": self.forwarder.state(),
            "images": self.images.state() if self.images is not None else None,
        }

    async def stop(self, timeout_s: float) -> None:
        """Forward what the journal holds (while the central store answers: a graceful stop or a pod scaled down
        leaves nothing behind), then stop both threads, all within ``timeout_s``; what is not forwarded by then
        stays in the journal for the next start."""
        t_end = asyncio.get_running_loop().time() + timeout_s
        if self.forwarder.state()["connected"]:
            drained = await asyncio.to_thread(self.forwarder.wait_drained, 0.5 * timeout_s)
            if not drained:
                logger.warning("central: %d record(s) not forwarded at stop; they go at the next start",
                               self.forwarder.state()["backlog"])  # fmt: skip
        timeout_s = max(0.5, t_end - asyncio.get_running_loop().time())
        threads = [t for t in (self.images, self.forwarder) if t is not None]
        ended = await asyncio.gather(*(asyncio.to_thread(t.stop, timeout_s) for t in threads))
        if not all(ended):
            logger.warning("central: a forwarding thread did not stop within %.1f s", timeout_s)
