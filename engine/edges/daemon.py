"""The composition root: wires config, store, writer, listeners and HTTP into one
process and one event loop, and shuts them down in the right order."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import uvicorn
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from engine.config import Config, ConfigError, ListenerConfig
from engine.edges.http_app import build_app
from engine.edges.mllp_listener import MllpListener
from engine.edges.normaliser_process import NormaliserProcess
from engine.edges.sms_replies import ReplyAuth, SmsReplies
from engine.logs import get_logger
from engine.mapping.mapset import MappingSetError
from engine.metrics import REFERRAL_CORE_FAMILIES, Metrics, select_families
from engine.outbound.packets.outreach import TemplateError
from engine.outbound.routing import OutboundError
from engine.policy.authorization import AuthorizationError
from engine.policy.language import PolicyError
from engine.services.dispatcher import Dispatcher
from engine.services.mappings import MappingHolder, OverlayError
from engine.services.normaliser import NormaliserWorker, sources_from
from engine.services.outreach_runtime import ROUTE as OUTREACH_ROUTE
from engine.services.outreach_runtime import planner_for, render_options
from engine.services.scheduler import OutreachPlanner, Scheduler
from engine.services.writer import GroupCommitWriter
from engine.store.database import (
    SchemaError,
    check_schema,
    current_revision,
    describe_failure,
    is_sqlite,
    open_engine,
    ping,
    upgrade,
)

log = get_logger("refloop.daemon")

DRAIN_SECONDS = 30.0


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix."""


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our loop: the daemon owns signal handling, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def prepare_database(config: Config) -> Engine:
    """Open the database and make sure its schema is current (or say how to fix it)."""
    url = config.database_url()
    try:
        engine = open_engine(
            url,
            pool_size=config.database.pool_size,
            sqlite_synchronous=config.database.sqlite_synchronous,
        )
        ping(engine)
    except (SQLAlchemyError, OSError) as exc:
        raise StartupError(
            f"{describe_failure(url, exc)}; check [database] url in the config or "
            "REFLOOP_DATABASE_URL, and that the server is running"
        ) from None
    auto = config.database.auto_upgrade
    if auto is None:
        auto = is_sqlite(url)
    try:
        check_schema(engine)
    except SchemaError:
        if not auto:
            engine.dispose()
            raise
        before, after = upgrade(engine)
        log.info("db.upgraded", before=before, after=after)
    return engine


def load_mappings(config: Config, metrics: Metrics) -> MappingHolder:
    """The mapping set the normaliser starts with, or a StartupError listing every problem
    (file:line:column) — the daemon does not run on a set it cannot trust."""
    root = config.mappings_dir()
    if not root.is_dir():
        raise StartupError(
            f"{config.source}: mappings.dir: {root} is not a folder; point [mappings] dir "
            "at the mapping set, or set [normalizer] enabled = false to only store messages"
        )
    try:
        return MappingHolder.load(
            root,
            config.overlays(),
            metrics,
            config.channels.keys(),
            config.outbound_dir(),
            policy_enabled=config.policy.enabled,
        )
    except (PolicyError, AuthorizationError) as exc:
        lines = "\n".join(f"  {e}" for e in exc.errors)
        raise StartupError(f"the referral policy in {root} did not load:\n{lines}") from None
    except OutboundError as exc:
        lines = "\n".join(f"  {e}" for e in exc.errors)
        raise StartupError(f"the outbound set in {root} did not load:\n{lines}") from None
    except MappingSetError as exc:
        lines = "\n".join(f"  {e}" for e in exc.errors) or f"  {exc}"
        raise StartupError(f"the mapping set in {root} did not load:\n{lines}") from None
    except OverlayError as exc:
        raise StartupError(f"{config.source}: {exc}") from None


def build_channels(config: Config) -> dict[str, Any]:
    """Every configured channel, built by its plugin: ``{name: (channel, settings)}``."""
    from channels.base import ChannelConfigError, ChannelContext
    from channels.registry import plugin

    context = ChannelContext(base_dir=config.source.parent)
    out: dict[str, Any] = {}
    for name, settings in config.channels.items():
        try:
            out[name] = (plugin(settings.type)(name, settings, context), settings)
        except ChannelConfigError as exc:
            lines = "; ".join(f"channels.{name}.{p}" for p in exc.problems)
            raise StartupError(f"{config.source}: {lines}") from None
    return out


class Daemon:
    def __init__(self, config: Config, *, install_signals: bool = True) -> None:
        self.config = config
        self.install_signals = install_signals
        self.ready = asyncio.Event()
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.writer: GroupCommitWriter | None = None
        self.normaliser: NormaliserWorker | None = None  # in-process mode
        self.normaliser_process: NormaliserProcess | None = None  # separate-process mode
        self.dispatcher: Dispatcher | None = None
        self.scheduler: Scheduler | None = None
        self.sms_replies: SmsReplies | None = None
        self.mappings: MappingHolder | None = None
        self.subscriptions: Any = None  # engine.services.subscriptions.SubscriptionManager
        self._reloader: asyncio.Task[None] | None = None
        self.listeners: list[MllpListener] = []
        self.http: _EmbeddedServer | None = None
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if self.install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self._on_signal, sig)
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, self.reload_mappings)
        mappings = None
        dispatching = self.config.outbound.enabled and bool(self.config.channels)
        if self.config.normalizer.enabled or dispatching:
            mappings = await asyncio.to_thread(load_mappings, self.config, self.metrics)
        self.mappings = mappings
        self.engine = await asyncio.to_thread(prepare_database, self.config)
        if dispatching and mappings is not None:
            from engine.outbound.packets.registry import renderers

            holder = mappings
            self.dispatcher = Dispatcher(
                self.engine,
                build_channels(self.config),
                await asyncio.to_thread(renderers),
                lambda rid: holder.outbound.specialist(rid),
                self.config.outbound,
                self.metrics,
                route_options=self._route_options(holder),
                render_processes=self.config.outbound.render_processes,
                policy=lambda: holder.policy,
            )
        if self.config.policy.enabled and mappings is not None:
            self.scheduler = self._build_scheduler(mappings)
        if not self.config.normalizer.enabled:
            mappings = None
        if mappings is not None and self.config.normalizer.separate_process:
            # Loaded here only to refuse a bad set before anything listens; the child
            # loads (and hot-reloads) its own.
            self.normaliser_process = NormaliserProcess(self.config)
            self.normaliser_process.on_outbox = self._wake_dispatcher
        elif mappings is not None:
            self.normaliser = NormaliserWorker(
                self.engine,
                mappings,
                self.metrics,
                sources_from(self.config.mllp.listeners, self.config.fhir.sources),
                self.config.normalizer,
                reload_seconds=self.config.mappings.reload_seconds,
            )
            if self.dispatcher is not None:
                self.normaliser.on_batch = self._wake_dispatcher
        lanes = self.config.ingest.writers or (1 if self.engine.dialect.name == "sqlite" else 2)
        self.writer = GroupCommitWriter(
            self.engine,
            self.metrics,
            max_batch=self.config.ingest.max_batch,
            lanes=lanes,
            on_commit=self._wake_normaliser(),
        )
        self.writer.start()
        http_task: asyncio.Task[None] | None = None
        try:
            if self.normaliser is not None:
                self.normaliser.start()
            if self.normaliser_process is not None:
                self.normaliser_process.start()
            if self.dispatcher is not None:
                self.dispatcher.start()
            if self.scheduler is not None:
                self.scheduler.start()
            if (self.dispatcher or self.scheduler) and self.normaliser is None:
                # The directory the dispatcher renders from and the policy the scheduler
                # fires follow the mapping folder here too (the normaliser reloads its own).
                self._reloader = asyncio.get_running_loop().create_task(self._follow())
            for index, lcfg in enumerate(self.config.mllp.listeners):
                listener = MllpListener(
                    lcfg,
                    self.writer,
                    self.metrics,
                    base_dir=self.config.source.parent,
                    commit_timeout=self.config.ingest.commit_timeout_seconds,
                )
                try:
                    await listener.start()
                except OSError as exc:
                    raise StartupError(
                        f"{self.config.source}: mllp.listeners[{index}] ({lcfg.name}): cannot "
                        f"listen on {lcfg.host}:{lcfg.port}: {exc.strerror or exc}"
                    ) from None
                self.listeners.append(listener)
            http_task = await self._start_http()
            if self.subscriptions is not None:
                # After HTTP is up: a server answers a new Subscription with a handshake.
                await self.subscriptions.start()
            schema = await asyncio.to_thread(current_revision, self.engine)
            log.info(
                "daemon.ready",
                listeners=[f"{x.cfg.name}:{x.port}" for x in self.listeners],
                http=f"{self.config.http.host}:{self.http_port}",
                schema=schema,
                mappings=mappings.current.digest if mappings else None,
            )
            self.ready.set()
            await self._stop.wait()
        finally:
            await self._shutdown(http_task)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.config.mappings.reload_seconds)
            if self.mappings is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.mappings.check)

    def reload_mappings(self) -> None:
        """SIGHUP: load the mapping set again now (a bad one keeps the running one)."""
        if self._reloader is not None and self.mappings is not None:
            holder = self.mappings
            asyncio.get_running_loop().run_in_executor(None, holder.reload)
        if self.normaliser is not None:
            log.info("daemon.reload_requested")
            self.normaliser.request_reload()
        if self.normaliser_process is not None:
            log.info("daemon.reload_requested")
            self.normaliser_process.request_reload()

    def _route_options(self, holder: MappingHolder) -> Callable[[str], Mapping[str, str]]:
        """Renderer options by route: the analysts' routes, and outreach's templates."""
        outreach = render_options(self.config)

        def options(route: str) -> Mapping[str, str]:
            return outreach if route == OUTREACH_ROUTE else holder.outbound.options(route)

        return options

    def _outreach_planner(self, holder: MappingHolder) -> OutreachPlanner | None:
        """The outreach planner, or a StartupError naming every template problem."""
        try:
            return planner_for(self.config, holder.policy)
        except TemplateError as exc:
            lines = "\n".join(f"  {e}" for e in exc.errors)
            raise StartupError(f"the outreach templates did not load:\n{lines}") from None

    def _build_scheduler(self, holder: MappingHolder) -> Scheduler:
        assert self.engine is not None
        return Scheduler(
            self.engine,
            policy=lambda: holder.policy,
            outbound=lambda: holder.outbound,
            outreach=self._outreach_planner(holder),
            metrics=self.metrics,
            batch=self.config.policy.batch,
            poll_seconds=self.config.policy.poll_seconds,
            on_commit=self._wake_dispatcher,
            kpi_seconds=self.config.policy.kpi_seconds,
        )

    def _wake_dispatcher(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.wake_threadsafe()

    def _wake_normaliser(self) -> Callable[[], None] | None:
        if self.normaliser is not None:
            return self.normaliser.wake_threadsafe
        if self.normaliser_process is not None:
            return self.normaliser_process.wake_threadsafe
        return None

    def exposition(self) -> bytes:
        """One metrics page: the daemon's own series, and the referral core's from the
        normaliser process once it has reported (the daemon's zeros until then)."""
        own = self.metrics.exposition()
        child = self.normaliser_process.metrics_text() if self.normaliser_process else b""
        if not child:
            return own
        return select_families(own, REFERRAL_CORE_FAMILIES, keep=False) + child

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("daemon.stopping", signal=sig.name)
        self._stop.set()

    def _fhir_routes(self) -> list[Any]:
        """The /fhir/r4 endpoints when the config has FHIR sources (else none)."""
        if not self.config.fhir.sources:
            return []
        from engine.edges.fhir_api import fhir_routes
        from engine.edges.fhir_auth import FhirAuth
        from engine.edges.fhir_notify import NotifyContext, notify_routes
        from engine.services.subscriptions import SubscriptionManager

        assert self.engine is not None
        assert self.writer is not None
        try:
            auth = FhirAuth.from_config(self.config)
        except ConfigError as exc:
            raise StartupError(f"{self.config.source}: fhir.sources: {exc}") from None
        self.subscriptions = SubscriptionManager(
            self.config, self.engine, self.writer, self.metrics
        )
        notify = notify_routes(
            NotifyContext(self.config, self.writer, self.metrics, self.subscriptions, auth)
        )
        return fhir_routes(
            self.config, self.writer, self.metrics, self.engine, notify_routes=notify, auth=auth
        )

    def _sms_reply_routes(self) -> list[Any]:
        """POST /sms/replies/<channel> when the sms channel exists, the policy runs and the
        gateway has a way to prove who it is (a token, or Twilio's signature)."""
        name = self.config.outreach.sms_channel
        settings = self.config.channels.get(name)
        if not self.config.policy.enabled or settings is None or self.mappings is None:
            return []
        base = self.config.source.parent
        out = self.config.outreach
        token = out.reply_token.read(base) if out.reply_token is not None else None
        twilio = None
        if out.reply_public_url and getattr(settings, "auth_token", None) is not None:
            with contextlib.suppress(Exception):
                twilio = settings.auth_token.read(base)
        if not token and not twilio:
            log.warning("sms_replies.disabled", channel=name, why="no reply_token or signature")
            return []
        assert self.engine is not None
        holder = self.mappings
        self.sms_replies = SmsReplies(
            self.engine,
            policy=lambda: holder.policy,
            channels={
                name: ReplyAuth(
                    token=token, twilio_auth_token=twilio, public_url=out.reply_public_url
                )
            },
            on_commit=self._wake_dispatcher,
        )
        return list(self.sms_replies.routes())

    async def _start_http(self) -> asyncio.Task[None]:
        app = build_app(
            self.metrics,
            exposition=self.exposition,
            database_ok=self._database_ok,
            listeners_ok=lambda: [(x.cfg.name, x.serving) for x in self.listeners],
            extra_routes=[*self._fhir_routes(), *self._sms_reply_routes()],
        )
        cfg = uvicorn.Config(
            app,
            host=self.config.http.host,
            port=self.config.http.port,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            # The CIDR checks of FHIR sources read the socket's peer: never a header a
            # client on loopback could set.
            proxy_headers=False,
        )
        try:
            host = self.config.http.host
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, self.config.http.port), family=family)
        except OSError as exc:
            raise StartupError(
                f"{self.config.source}: http: cannot listen on {self.config.http.host}:"
                f"{self.config.http.port}: {exc.strerror or exc}"
            ) from None
        self.http = _EmbeddedServer(cfg)
        task = asyncio.get_running_loop().create_task(self.http.serve(sockets=[sock]))
        while not self.http.started:
            if task.done():
                task.result()
                raise StartupError("the HTTP server stopped during startup")
            await asyncio.sleep(0.01)
        return task

    @property
    def http_port(self) -> int:
        """The bound HTTP port (differs from the config when it asked for port 0)."""
        if self.http is None or not self.http.servers:
            return self.config.http.port
        return int(self.http.servers[0].sockets[0].getsockname()[1])

    def _database_ok(self) -> bool:
        if self.engine is None:
            return False
        try:
            ping(self.engine)
        except SQLAlchemyError:
            return False
        return True

    async def _shutdown(self, http_task: asyncio.Task[None] | None) -> None:
        # 1. stop accepting; 2. finish what was received (ACKs included);
        # 3. stop HTTP; 4. commit what is queued; 5. stop the normaliser; 6. close the database.
        for listener in self.listeners:
            await listener.stop_accepting()
        await asyncio.gather(*(x.drain(DRAIN_SECONDS) for x in self.listeners))
        if self.subscriptions is not None:
            await self.subscriptions.stop()
        if self.http is not None:
            self.http.should_exit = True
        if http_task is not None:
            with contextlib.suppress(Exception):
                await http_task
        if self.writer is not None:
            await asyncio.to_thread(self.writer.stop)
        if self.normaliser is not None:
            # It finishes the batch in hand; messages still `received` wait for the next start.
            await self.normaliser.stop()
        if self.normaliser_process is not None:
            await self.normaliser_process.stop()
        if self._reloader is not None:
            self._reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloader
        if self.sms_replies is not None:
            await asyncio.to_thread(self.sms_replies.close)
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.dispatcher is not None:
            # Last: what the normaliser enqueued while draining still goes out, and
            # deliveries on the wire get stop_seconds to finish.
            await self.dispatcher.stop()
        if self.engine is not None:
            self.engine.dispose()
        log.info("daemon.stopped")


def with_overrides(
    config: Config, *, mllp_port: int | None = None, http_port: int | None = None
) -> Config:
    """Command-line port overrides (benchmarks, side-by-side runs)."""
    if mllp_port is not None:
        if config.mllp.listeners:
            first = config.mllp.listeners[0].model_copy(update={"port": mllp_port})
            listeners = (first, *config.mllp.listeners[1:])
        else:
            listeners = (ListenerConfig(name="default", port=mllp_port),)
        config = config.model_copy(
            update={"mllp": config.mllp.model_copy(update={"listeners": listeners})}
        )
    if http_port is not None:
        config = config.model_copy(
            update={"http": config.http.model_copy(update={"port": http_port})}
        )
    return config
