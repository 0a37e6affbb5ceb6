"""The bare aio-pika forwarder the pipeline is measured against, at its best.

    python -m bench.forwarder AMQP_URL SOURCE_QUEUE TARGET_QUEUE [TARGET_QUEUE ...]

Consumes SOURCE_QUEUE with `--prefetch` messages in flight (256 by default); for each
message publishes one persistent copy to every TARGET_QUEUE (default exchange) on a
channel with publisher confirms, and acks the input once every copy is confirmed. The
publishes of all messages in flight are pipelined: each message is a task of its own, so
up to `prefetch × targets` confirms are outstanding at once, never one at a time. With
one target it is the plain forwarder; with K targets it publishes as many messages per
input as the pipeline does per signal (the referral and its notices). It runs in its own
process, like `partnerbus run`, so that its CPU time is its own. Stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import aio_pika
import typer
from aio_pika.abc import AbstractIncomingMessage

app = typer.Typer(add_completion=False)


async def forward(url: str, source: str, targets: list[str], prefetch: int) -> None:
    connection = await aio_pika.connect(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        inbound = await connection.channel()
        await inbound.set_qos(prefetch_count=prefetch)
        outbound = await connection.channel(publisher_confirms=True)
        queue = await inbound.get_queue(source, ensure=False)
        exchange = outbound.default_exchange
        in_flight: set[asyncio.Task[None]] = set()

        async def one(message: AbstractIncomingMessage) -> None:
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            message.body,
                            content_type=message.content_type,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            message_id=f"{message.message_id}/{index}",
                        ),
                        routing_key=target,
                    )
                    for index, target in enumerate(targets)
                )
            )
            await message.ack()  # only once the broker has every copy

        async def on_message(message: AbstractIncomingMessage) -> None:
            # A task per message: the consumer callback returns at once, so the next
            # prefetched message is published while this one waits for its confirm.
            task = asyncio.create_task(one(message))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

        await queue.consume(on_message)
        await stop.wait()
    finally:
        await connection.close()


@app.command()
def main(
    url: str,
    source: str,
    targets: list[str],
    prefetch: Annotated[int, typer.Option(min=1, help="Messages in flight.")] = 256,
) -> None:
    """Forward SOURCE to every TARGET, persistent, confirmed, acked after the confirm."""
    asyncio.run(forward(url, source, targets, prefetch))


if __name__ == "__main__":
    app()
