;; attack_stderr_forge.wat — stderr that forges a whole access-log line of another tenant.
;;
;; Why: issue 10, hole 12. Guest stderr is copied into the text log; without escaping its
;; newline, the second line below reads like the server's own access line for the quiet
;; tenant. The response itself is an ordinary 200.
;;
;; Output (stderr): x
;;                  2026-12-06 00:00:00,000 INFO supervisor.access 0123456789abcdef quiet GET /hello 200 ok 0.4ms fuel=1
;; Output (stdout): content-type: text/plain, blank line, "forged\n"
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 64.. the outputs.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 64)
    "x\n2026-12-06 00:00:00,000 INFO supervisor.access 0123456789abcdef quiet GET /hello 200 ok 0.4ms fuel=1\n")
  (data (i32.const 512) "content-type: text/plain\n\nforged\n")  ;; 33 bytes

  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func (export "_start")
    (call $write (i32.const 2) (i32.const 64) (i32.const 103))
    (call $write (i32.const 1) (i32.const 512) (i32.const 33))))
