;; flood.wat — prints a header block, then 64 KiB buffers of "x" forever.
;;
;; Why: a response without end. The host must stop the guest once stdout
;; passes max_response_bytes (502) instead of buffering without bound. Write
;; errors are ignored on purpose: the host cannot count on a guest to stop.
;;
;; Output:  content-type: text/plain
;;          (blank line)
;;          xxxx…  without end
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the header block;
;;          65536..131071 the buffer of "x".
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 2)

  (global $BUF i32 (i32.const 65536))
  (global $BUF_LEN i32 (i32.const 65536))

  (data (i32.const 16) "content-type: text/plain\n\n")  ;; 26 bytes

  (func (export "_start")
    (memory.fill (global.get $BUF) (i32.const 0x78) (global.get $BUF_LEN))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 26))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (loop $forever
      (i32.store (i32.const 0) (global.get $BUF))
      (i32.store (i32.const 4) (global.get $BUF_LEN))
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br $forever))))
