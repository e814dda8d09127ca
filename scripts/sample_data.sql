-- Sample data for `make run`: a few realistic errors in several languages.
SELECT fraiseql_set_trace_context('00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01');

SELECT fraiseql_capture_error('ValueError', 'invalid literal for int() with base 10: ''abc''',
E'Traceback (most recent call last):\n  File "/srv/app/releases/2026-11-20/api/orders.py", line 42, in create_order\n    qty = int(payload["qty"])\nValueError: invalid literal for int() with base 10: ''abc''',
'{"user_id": "u-17", "path": "/orders", "method": "POST"}', 'production', 'error', 'v1.4.2')
FROM generate_series(1, 12);

SELECT fraiseql_capture_error('TypeError', 'Cannot read properties of undefined (reading ''id'')',
E'TypeError: Cannot read properties of undefined (reading ''id'')\n    at renderCart (https://cdn.example.com/static/js/main.3f2a9c1b.js:1:20931)\n    at Cart (https://cdn.example.com/static/js/main.3f2a9c1b.js:1:18211)\n    at renderWithHooks (https://cdn.example.com/static/js/vendor.99aa11bb.js:2:1)',
jsonb_build_object('user_id', 'u-' || g), 'production', 'error', 'web-2026.11.3')
FROM generate_series(1, 7) g;

SELECT fraiseql_capture_error('PaymentError', 'Payment gateway timeout after 3000ms',
E'com.acme.pay.GatewayTimeout: Payment gateway timeout after 3000ms\n\tat com.acme.pay.StripeClient.charge(StripeClient.java:88)\n\tat com.acme.pay.PaymentService.process(PaymentService.java:41)\n\tat java.base/java.lang.Thread.run(Thread.java:829)',
'{"order_id": "42", "user_id": "u-3"}', 'production', 'critical', 'pay-3.1.0')
FROM generate_series(1, 3);

SELECT fraiseql_capture_error('NotFound', 'User ' || g || ' not found', NULL, '{}', 'staging', 'warning')
FROM generate_series(1000, 1004) g;

SELECT fraiseql_capture_message('Nightly import finished in ' || (100 + g) || 'ms', 'info')
FROM generate_series(1, 2) g;

SELECT fraiseql_flush_counts();
