;; cookies.wat — prints two Set-Cookie headers.
;;
;; Why: a repeated header keeps every value (WAGI kept only the last), so both
;; cookies reach the client.
;;
;; Output:  content-type: text/plain
;;          Set-Cookie: a=1; Path=/
;;          Set-Cookie: b=2; Path=/
;;          (blank line)
;;          two cookies
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the output.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 16)  ;; 86 bytes
    "content-type: text/plain\n"
    "Set-Cookie: a=1; Path=/\n"
    "Set-Cookie: b=2; Path=/\n"
    "\n"
    "two cookies\n")

  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 86))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
