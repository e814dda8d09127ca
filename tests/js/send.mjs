// Sends with the official JS clients, unchanged but for where they send:
//   node send.mjs sentry <dsn> <release>
//   node send.mjs otel <endpoint> <key> <trace name>
import * as Sentry from "@sentry/node";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { BasicTracerProvider, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base";
import { resourceFromAttributes } from "@opentelemetry/resources";

const [mode, ...args] = process.argv.slice(2);

if (mode === "sentry") {
  const [dsn, release] = args;
  Sentry.init({ dsn, release, environment: "node-test", defaultIntegrations: false });
  Sentry.setUser({ id: "node-user" });
  function parseOrder(raw) {
    return JSON.parse(raw).items.length;
  }
  function handleRequest(raw) {
    return parseOrder(raw);
  }
  for (const raw of ["{", "{\"items\":"]) {
    try {
      handleRequest(raw);
    } catch (e) {
      Sentry.captureException(e);
    }
  }
  // over 32 KiB: the SDK gzips it (and sends it chunked)
  Sentry.captureMessage("big payload " + "x".repeat(40000), { level: "warning", extra: { blob: "y".repeat(40000) } });
  const ok = await Sentry.flush(10000);
  if (!ok) {
    console.error("flush did not complete");
    process.exit(1);
  }
} else if (mode === "otel") {
  const [endpoint, key, name] = args;
  const exporter = new OTLPTraceExporter({ url: `${endpoint}/v1/traces`, headers: { Authorization: `Bearer ${key}` } });
  const provider = new BasicTracerProvider({
    resource: resourceFromAttributes({ "service.name": "js-shop", "deployment.environment": "js-test" }),
    spanProcessors: [new SimpleSpanProcessor(exporter)],
  });
  const tracer = provider.getTracer("test");
  const span = tracer.startSpan(name, { attributes: { "http.method": "GET" } });
  span.end();
  await provider.forceFlush();
  await provider.shutdown();
} else {
  console.error("usage: send.mjs sentry|otel ...");
  process.exit(2);
}
