;; response_head_echo.wat — prints its stdin (the request body) as its stdout.
;;
;; Why: the tests choose the exact CGI output, byte for byte (a header block of
;; exactly N lines or N bytes), with one guest.
;;
;; Output:  the request body, unchanged
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes read or written;
;;          65536..131071 the buffer.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                   (param $nread i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 2)

  (global $BUF i32 (i32.const 65536))
  (global $BUF_LEN i32 (i32.const 65536))

  ;; Write [ptr, ptr+len) to fd, retrying short writes; stops on an error or a
  ;; write that makes no progress.
  (func $write_all (param $fd i32) (param $ptr i32) (param $len i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (br_if $done (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $done (i32.eqz (i32.load (i32.const 8))))
        (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
        (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
        (br $more))))

  ;; Read a buffer at a time until end of input (or an error), writing each.
  (func (export "_start")
    (block $eof
      (loop $more
        (i32.store (i32.const 0) (global.get $BUF))
        (i32.store (i32.const 4) (global.get $BUF_LEN))
        (br_if $eof (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $eof (i32.eqz (i32.load (i32.const 8))))
        (call $write_all (i32.const 1) (global.get $BUF) (i32.load (i32.const 8)))
        (br $more)))))
