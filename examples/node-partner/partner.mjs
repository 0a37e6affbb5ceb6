// A partner of partnerbus written with amqplib alone, from the message contracts
// (docs/asyncapi.yaml, docs/schemas/). Nothing here comes from partnerbus. The wire facts:
//
// - connect as the partner's own RabbitMQ user; set `userId` to that user on every publish
//   (RabbitMQ closes the channel if it is anyone else);
// - signals go to `<prefix>.signals` with routing key the partner id (`<id>.urgent` when
//   urgent or asap); statuses to `<prefix>.statuses` with routing key the partner id;
// - messages are persistent JSON with a unique `messageId` (the body's `message_id`); on a
//   confirm channel the broker says when it has them (a nack or an unroutable message throws);
// - the partner reads only its queue `<prefix>.partner.<id>`; each body says its `type`.
//
// Environment:
//   PARTNER_AMQP_URL    amqp://pb-ccas-roubaix:SECRET@localhost:5672/  (its own user)
//   PARTNER_ID          ccas-roubaix
//   PARTNERBUS_PREFIX   partnerbus (the default)
//   PARTNER_SIGNAL      optional: a signal's fields as JSON, published once before consuming, e.g.
//                       {"person_ref":"T-000123","commune":"59512","needs":["logement-hebergement--reduire-les-impayes-de-loyer"]}
//   PARTNER_EXIT_AFTER  optional: stop after this many referrals handled (else on SIGTERM/SIGINT)
//   PARTNER_COMPLETE    "no": accept each referral and hold it (else accept, then complete)
//
// stdout: one JSON line per event: {"event":"consuming"}, {"event":"received","body":…},
// {"event":"sent","body":…}, {"event":"dropped","referral_id":…} and {"event":"rejected",…}.
// Run: npm ci && PARTNER_AMQP_URL=… PARTNER_ID=… node partner.mjs

import { randomUUID } from 'node:crypto';
import amqp from 'amqplib';

const url = process.env.PARTNER_AMQP_URL;
const partnerId = process.env.PARTNER_ID;
const prefix = process.env.PARTNERBUS_PREFIX || 'partnerbus';
const exitAfter = Number(process.env.PARTNER_EXIT_AFTER || 0);
const complete = process.env.PARTNER_COMPLETE !== 'no';
const user = decodeURIComponent(new URL(url).username);
const queue = `${prefix}.partner.${partnerId}`;

const print = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);

// What every message carries: its type, a unique id, when it happened (RFC 3339, with offset).
const envelope = (type) => ({
  type,
  message_id: randomUUID(),
  occurred_at: new Date().toISOString().replace('Z', '+00:00'),
  schema_version: 2,
});

const connection = await amqp.connect(url);
const channel = await connection.createConfirmChannel();
await channel.prefetch(10);
const returned = new Set(); // message ids the broker could not route (mandatory)
channel.on('return', (message) => returned.add(message.properties.messageId));

function publish(exchange, routingKey, body) {
  const content = Buffer.from(JSON.stringify(body));
  const options = {
    contentType: 'application/json',
    persistent: true,
    messageId: body.message_id,
    type: body.type,
    userId: user, // the broker vouches for it: the bus trusts it
    mandatory: true, // no queue bound: returned, and thrown below, not silently dropped
  };
  return new Promise((resolve, reject) => {
    channel.publish(`${prefix}.${exchange}`, routingKey, content, options, (err) => {
      if (err) return reject(err);
      if (returned.delete(body.message_id)) return reject(new Error(`unroutable: ${routingKey}`));
      print({ event: 'sent', body });
      resolve(body);
    });
  });
}

function signal(fields) {
  const body = { ...envelope('signal'), source: partnerId, urgency: 'routine', ...fields };
  const urgent = ['urgent', 'asap'].includes(body.urgency);
  return publish('signals', urgent ? `${partnerId}.urgent` : partnerId, body);
}

function status(referralId, value, extra = {}) {
  const body = {
    ...envelope('referral-status-changed'),
    referral_id: referralId,
    partner: partnerId,
    status: value,
    ...extra,
  };
  return publish('statuses', partnerId, body);
}

const held = new Map(); // referral id -> referral being worked on
let handled = 0;

async function take(referral) {
  held.set(referral.referral_id, referral);
  await status(referral.referral_id, 'accepted');
  if (complete) {
    const outcome = `${referral.need}: met the person, a plan is agreed`;
    await status(referral.referral_id, 'completed', { outcome });
    held.delete(referral.referral_id);
  }
}

function parse(message) {
  const body = JSON.parse(message.content.toString('utf8'));
  if (typeof body?.type !== 'string') throw new Error('no type');
  if (body.type.startsWith('referral') && typeof body.referral_id !== 'string') {
    throw new Error('no referral_id');
  }
  return body;
}

async function onMessage(message) {
  let body;
  try {
    body = parse(message);
  } catch (err) {
    // Not a message we understand: to the queue's dead-letter queue, kept visible.
    channel.nack(message, false, false);
    print({ event: 'rejected', message_id: message.properties.messageId, error: err.message });
    return;
  }
  print({ event: 'received', body });
  if (body.type === 'referral') {
    await take(body);
    handled += 1;
  } else if (body.type === 'referral-withdrawn' && held.delete(body.referral_id)) {
    print({ event: 'dropped', referral_id: body.referral_id }); // consent gone: drop the data
  }
  channel.ack(message); // only once handled: else it comes again
  if (exitAfter > 0 && handled >= exitAfter) setImmediate(stop, 0);
}

let stopping = false;
let consumerTag;
const working = new Set(); // messages being handled

async function stop(code) {
  if (stopping) return;
  stopping = true;
  if (consumerTag) await channel.cancel(consumerTag).catch(() => {});
  await Promise.allSettled([...working]);
  await connection.close().catch(() => {});
  process.exit(code);
}

function fail(err) {
  process.stderr.write(`partner ${partnerId}: ${err.stack || err}\n`);
  process.exit(1); // what was not acked comes back to the next run
}

channel.on('error', fail);
connection.on('error', fail);
channel.on('close', () => stopping || fail(new Error('channel closed')));
process.on('SIGTERM', () => stop(0));
process.on('SIGINT', () => stop(0));

if (process.env.PARTNER_SIGNAL) await signal(JSON.parse(process.env.PARTNER_SIGNAL));
({ consumerTag } = await channel.consume(queue, (message) => {
  if (message === null) return fail(new Error('consumer cancelled by the broker'));
  const job = onMessage(message).catch(fail);
  working.add(job);
  job.finally(() => working.delete(job));
}));
print({ event: 'consuming', queue });
