// Produces sdk_export.json: spans recorded with the official OpenTelemetry JS
// SDK and serialized by its own OTLP/JSON serializer (what the OTLP/HTTP JSON
// exporter sends). Run: npm install && node generate.js
const { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } = require('@opentelemetry/sdk-trace-base');
const { resourceFromAttributes } = require('@opentelemetry/resources');
const { JsonTraceSerializer } = require('@opentelemetry/otlp-transformer');
const api = require('@opentelemetry/api');
const fs = require('fs');

const exporter = new InMemorySpanExporter();
const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({ 'service.name': 'orders-api', 'deployment.environment': 'staging', 'service.version': '1.4.2' }),
  spanProcessors: [new SimpleSpanProcessor(exporter)],
});
const tracer = provider.getTracer('fraiseql-fixture', '1.0.0');

const root = tracer.startSpan('POST /orders', { kind: api.SpanKind.SERVER, attributes: { 'http.method': 'POST', 'http.status_code': 500, 'user_id': 'u-17' } });
const ctx = api.trace.setSpan(api.context.active(), root);
const db = tracer.startSpan('db.query', { kind: api.SpanKind.CLIENT, attributes: { 'db.system': 'postgresql', 'db.statement': 'SELECT * FROM v_order WHERE user_id = $1', 'db.rows_returned': 3, 'tags': ['a', 'b'], 'ratio': 0.25, 'cached': false } }, ctx);
db.addEvent('rows fetched', { count: 3 });
db.end();
const pay = tracer.startSpan('charge card', { kind: api.SpanKind.CLIENT, links: [{ context: db.spanContext(), attributes: { reason: 'retry' } }] }, ctx);
pay.setStatus({ code: api.SpanStatusCode.ERROR, message: 'gateway timeout' });
pay.recordException(new Error('Payment gateway timeout'));
pay.end();
root.end();

const bytes = JsonTraceSerializer.serializeRequest(exporter.getFinishedSpans());
fs.writeFileSync(__dirname + '/sdk_export.json', Buffer.from(bytes).toString('utf8') + '\n');
console.log('wrote sdk_export.json with', exporter.getFinishedSpans().length, 'spans');
