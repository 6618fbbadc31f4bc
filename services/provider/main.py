"""`nexus provider`: LLM calls from NATS (queue group `provider`) to model runtimes."""

from __future__ import annotations

import logging

from nats.aio.msg import Msg

from shared.contracts import subjects
from shared.contracts.messages import CompletionRequest, ModelsReply, ModelsRequest
from shared.infra.messaging import HandlerError
from shared.infra.service import ServiceRuntime, freeze_startup_heap, run_service
from shared.infra.settings import get_settings
from shared.contracts.frames import Failed
from shared.infra.streaming import ConsumerLost, StreamSender
from services.provider import config as provider_config
from services.provider.router import Router

log = logging.getLogger("nexus.provider")


class ProviderService:
    def __init__(self, runtime: ServiceRuntime, router: Router) -> None:
        self.runtime = runtime
        self.router = router

    async def start(self) -> None:
        bus = self.runtime.bus
        assert bus is not None
        await bus.subscribe(subjects.PROVIDER_COMPLETE, CompletionRequest, self.on_complete,
                            queue=subjects.QUEUE_PROVIDER, concurrent=True)
        await bus.subscribe(subjects.PROVIDER_MODELS, ModelsRequest, self.on_models,
                            queue=subjects.QUEUE_PROVIDER)

    async def on_models(self, request: ModelsRequest, msg: Msg) -> ModelsReply:
        return ModelsReply(models=self.router.models(), node_provider=self.router.node_provider,
                           node_context=self.router.installed_context)

    async def on_complete(self, request: CompletionRequest, msg: Msg) -> None:
        if not msg.reply:
            raise HandlerError("NoReplySubject", "completion requests need a reply subject")
        bus = self.runtime.bus
        assert bus is not None
        async with StreamSender(bus, msg.reply, batches=request.batch_frames) as sender:
            try:
                outcome = await self.router.run(request, sender)
            except ConsumerLost as exc:
                outcome = Failed(error="Cancelled", detail=str(exc), status=499)
            except Exception as exc:  # a bug must still end the stream cleanly
                log.exception("completion failed", extra={"call_id": request.call_id})
                outcome = Failed(error=type(exc).__name__, detail="internal error in provider",
                                 status=500)
            if isinstance(outcome, Failed):
                await sender.fail(outcome)
            else:
                await sender.done(outcome)


async def run(runtime: ServiceRuntime) -> None:
    runtime.install_signal_handlers()
    config = provider_config.load(runtime.settings)
    await runtime.start(database=True)
    from shared.domain.policy import redact_kinds

    router = Router(config, runtime.store, redactor=redact_kinds, bus=runtime.bus,
                    installed_context=runtime.settings.model_context)
    service = ProviderService(runtime, router)
    await service.start()
    freeze_startup_heap()
    log.info("provider ready", extra={"targets": sorted(router.targets), "routes": sorted(router.routes)})
    try:
        await runtime.wait_for_stop()
    finally:
        await runtime.stop()
        await router.close()


def main() -> None:
    runtime = ServiceRuntime("provider", get_settings())
    runtime.setup_process()
    run_service(run(runtime))


if __name__ == "__main__":
    main()
