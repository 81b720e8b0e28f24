// Go's net/http on the socket `switcheroo run` passes as fd 3 (net.FileListener), with
// the shutdown that keeps keep-alive clients from racing a closing connection.
//
// srv.Shutdown closes idle keep-alive connections at once (so does
// SetKeepAlivesEnabled(false)), and a client that sends its next request at that moment
// gets an EOF. So: run with `--notify-replaced USR1`; on SIGUSR1 every response says
// `Connection: close` (net/http then closes the connection after it), and on SIGTERM,
// which follows the drain, Shutdown finds the clients gone.
package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	ln, err := net.FileListener(os.NewFile(3, "socket"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "fd 3:", err)
		os.Exit(1)
	}
	var replaced atomic.Bool
	body := fmt.Sprintf("hello from pid %d port %s", os.Getpid(), os.Getenv("SWITCHEROO_PORT"))
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if replaced.Load() {
			w.Header().Set("Connection", "close")
		}
		fmt.Fprint(w, body)
	})}
	notices := make(chan os.Signal, 1)
	signal.Notify(notices, syscall.SIGUSR1)
	go func() {
		for range notices {
			replaced.Store(true)
		}
	}()
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	done := make(chan struct{})
	go func() {
		<-stop
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		srv.Shutdown(ctx) // waits for the requests in flight
		close(done)
	}()
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	<-done
}
