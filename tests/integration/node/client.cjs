// A Node.js producer and caller of amqtask tasks, written from the README's "Wire format"
// section only (no amqtask code). Prints one JSON object per line on stdout.
//
//   node client.cjs tasks      send, send with a delay, and call tasks (env below)
//   node client.cjs asyncapi FILE   parse an AsyncAPI document with the official parser
//
// Environment for `tasks`: AMQP_URL, NAMESPACE, NOTIFY (a task without a result), RESIZE (a
// task with a result), FAIL (a task with a result whose handler raises).
'use strict';

const crypto = require('crypto');
const fs = require('fs');

const DELAY_LEVELS = 20;

function out(record) {
  process.stdout.write(JSON.stringify(record) + '\n');
}

// The routing key of a delayed task: the delay in whole seconds as 20 binary digits, most
// significant first, each followed by a dot, then the work queue's name.
function delayKey(seconds, queue) {
  const bits = [];
  for (let level = DELAY_LEVELS - 1; level >= 0; level--) bits.push(String((seconds >> level) & 1));
  return bits.join('.') + '.' + queue;
}

function taskMessage(task, version, payload, extra = {}) {
  const body = Buffer.from(JSON.stringify(payload), 'utf8');
  const options = {
    contentType: 'application/json',
    messageId: crypto.randomUUID(),
    persistent: true, // delivery_mode 2
    type: task,
    mandatory: true,
    headers: { 'amqtask-task': task, 'amqtask-version': version, ...(extra.headers || {}) },
    ...extra.properties,
  };
  return { body, options };
}

async function publishConfirmed(channel, exchange, routingKey, message) {
  await new Promise((resolve, reject) => {
    channel.publish(exchange, routingKey, message.body, message.options, (err) =>
      err ? reject(new Error(`nacked: ${err}`)) : resolve(),
    );
  });
  return message.options.messageId;
}

async function tasks() {
  const amqp = require('amqplib');
  const ns = process.env.NAMESPACE;
  const connection = await amqp.connect(process.env.AMQP_URL);
  try {
    const channel = await connection.createConfirmChannel();
    const returned = [];
    channel.on('return', (msg) => returned.push(msg.fields.routingKey));

    // A task: the task exchange, routing key {task}.v{version}.
    const notify = process.env.NOTIFY;
    const sent = await publishConfirmed(
      channel, `${ns}.tasks`, `${notify}.v1`, taskMessage(notify, 1, { user: 'ada', text: 'hello' }),
    );
    out({ sent });

    // A delayed task: the delay levels' entry exchange, routing key from the delay and the queue.
    const before = Date.now();
    const delayed = await publishConfirmed(
      channel, `${ns}.delay.${DELAY_LEVELS - 1}`, delayKey(1, notify),
      taskMessage(notify, 1, { user: 'ada', text: 'later' }),
    );
    out({ delayed, before });

    // Calls: consume direct reply-to (no-ack) on the channel that publishes the requests.
    const pending = new Map();
    await channel.consume('amq.rabbitmq.reply-to', (msg) => {
      const waiter = pending.get(msg.properties.correlationId);
      if (waiter) waiter(msg);
    }, { noAck: true });

    async function call(task, payload, timeoutMs) {
      const correlationId = crypto.randomUUID();
      const message = taskMessage(task, 1, payload, {
        headers: { 'amqtask-deadline': Date.now() + timeoutMs },
        properties: {
          replyTo: 'amq.rabbitmq.reply-to',
          correlationId,
          expiration: String(timeoutMs),
        },
      });
      const reply = new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no reply to ${task} in ${timeoutMs} ms`)), timeoutMs);
        pending.set(correlationId, (msg) => { clearTimeout(timer); resolve(msg); });
      });
      await publishConfirmed(channel, `${ns}.tasks`, `${task}.v1`, message);
      const msg = await reply;
      pending.delete(correlationId);
      const headers = msg.properties.headers || {};
      if (headers['amqtask-reason'] !== undefined) {
        return {
          task,
          error: {
            reason: String(headers['amqtask-reason']),
            message: String(headers['amqtask-error']),
            type: headers['amqtask-error-type'] === undefined ? null : String(headers['amqtask-error-type']),
            traceback: headers['amqtask-traceback'] !== undefined,
          },
          correlated: msg.properties.correlationId === correlationId,
        };
      }
      return {
        task,
        result: JSON.parse(msg.content.toString('utf8')),
        contentType: msg.properties.contentType,
        correlated: msg.properties.correlationId === correlationId,
      };
    }

    out(await call(process.env.RESIZE, { path: 'a.png', width: 64 }, 20000));
    out(await call(process.env.FAIL, { path: 'b.png', width: 1 }, 20000));
    out(await call(process.env.RESIZE, { path: 'c.png', width: 'wide' }, 20000));
    out({ returned });
    await channel.close();
  } finally {
    await connection.close();
  }
}

async function asyncapi(file) {
  const { Parser } = require('@asyncapi/parser');
  const { document, diagnostics } = await new Parser().parse(fs.readFileSync(file, 'utf8'));
  out({
    valid: document !== undefined,
    // severity 0 is an error, 1 a warning; 2 and 3 are information and hints
    problems: diagnostics
      .filter((d) => d.severity <= 1)
      .map((d) => `${d.code}: ${d.message} at ${JSON.stringify(d.path)}`),
  });
}

const [mode, arg] = process.argv.slice(2);
(mode === 'asyncapi' ? asyncapi(arg) : tasks()).catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
