;; response_head_stderr.wat — writes a forged access-log line to stderr, then
;; prints a valid response.
;;
;; Why: guest stderr goes into the process log. Copied as is, its newline
;; would start a line of the guest's choosing: here, one that reads as an
;; access-log line of another tenant. The host must keep it on the guest's own
;; line (control characters escaped).
;;
;; Output:  stderr: "x", newline, "FORGED-ID victim GET /pay 200 ok 1.0ms
;;                  fuel=0", CR, ESC "[2K", newline
;;          stdout: content-type: text/plain, blank line, "ok\n"
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. stderr text;
;;          128.. the response.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 16) "x\nFORGED-ID victim GET /pay 200 ok 1.0ms fuel=0\r\1b[2K\n")  ;; 53 bytes
  (data (i32.const 128) "content-type: text/plain\n\nok\n")  ;; 29 bytes

  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func (export "_start")
    (call $write (i32.const 2) (i32.const 16) (i32.const 53))
    (call $write (i32.const 1) (i32.const 128) (i32.const 29))))
