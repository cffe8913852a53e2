;; bad_header.wat — prints a header whose value holds a control character (\x01).
;;
;; Why: a header that is not valid HTTP must give a 502, not a crash or a dropped
;; connection (WAGI's behaviour).
;;
;; Output:  content-type: text/plain
;;          x-bad: a\x01b
;;          (blank line)
;;          bad header
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the output.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 16) "content-type: text/plain\nx-bad: a\01b\n\nbad header\n")  ;; 48 bytes

  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 48))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
