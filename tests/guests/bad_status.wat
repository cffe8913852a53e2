;; bad_status.wat — prints `Status: 99`, outside the HTTP range.
;;
;; Why: a Status that is not a number from 100 to 999 is the guest's fault and
;; must become a 502, never a response with a nonsense status line.
;;
;; Output:  Status: 99
;;          content-type: text/plain
;;          (blank line)
;;          bad status
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the output.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 16) "Status: 99\ncontent-type: text/plain\n\nbad status\n")  ;; 48 bytes

  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 48))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
